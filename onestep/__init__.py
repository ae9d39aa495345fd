"""onestep: distil multi-step diffusion teachers into one-step generators, export to diffusers, measure FID."""
from .denoiser import Denoiser
from .generator import Generator
from .schedule import Schedule
from .triad import Triad

__version__ = "0.1.0"
__all__ = ["Denoiser", "Generator", "Schedule", "Triad", "__version__"]

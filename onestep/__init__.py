"""onestep: distil multi-step diffusion teachers into one-step generators, export to diffusers, measure FID."""
import logging

# bitsandbytes (imported by diffusers wherever it is installed) warns on import, on CPUs with AVX512-BF16, that a
# 4-bit matmul kernel package is missing; onestep never runs 4-bit matmuls, and bad input must print one line.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .denoiser import Denoiser
from .generator import Generator
from .schedule import Schedule
from .triad import Triad

__version__ = "0.1.0"
__all__ = ["Denoiser", "Generator", "Schedule", "Triad", "__version__"]

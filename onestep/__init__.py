"""onestep: distil multi-step diffusion teachers into one-step generators, export to diffusers, measure FID."""
import logging
import warnings

# bitsandbytes (imported by diffusers wherever it is installed) warns on import, on CPUs with AVX512-BF16, that a
# 4-bit matmul kernel package is missing; onestep never runs 4-bit matmuls, and bad input must print one line.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# diffusers < 0.37 decorates a model class with torch.autocast(device_type="cuda") at import; on a machine without CUDA
# torch < 2.6 warns about it once per process, before any onestep code runs.
warnings.filterwarnings("ignore", message="User provided device_type of 'cuda', but CUDA is not available",
                        category=UserWarning)

from .denoiser import Denoiser
from .generator import Generator
from .schedule import Schedule
from .triad import Triad

__version__ = "0.1.0"
__all__ = ["Denoiser", "Generator", "Schedule", "Triad", "__version__"]

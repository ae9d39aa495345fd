"""One switch for the attention kernel of every network in the triad: "sdpa", "xformers" or "auto"."""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

BACKENDS = ("sdpa", "xformers", "auto")


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    """True where xformers imports, a CUDA device is present and its attention kernel runs there. A wheel built for
    another torch or CUDA imports with a warning and then has no kernels: one tiny call finds that out."""
    if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
        return False
    try:
        import xformers.ops

        q = torch.zeros(1, 8, 1, 8, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception:  # no usable build for this torch: import error, or NotImplementedError at the first call
        return False
    return True


def resolve_attention(backend: str) -> str:
    """'auto' -> xformers where usable, else sdpa; 'xformers' without it -> a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "xformers" if xformers_available() else "sdpa"
    if backend == "xformers" and not xformers_available():
        raise ValueError("attention 'xformers' needs the xformers package built for this torch and CUDA, and a CUDA GPU "
                         "(pip install 'onestep[xformers]' on a GPU machine); use --attention sdpa or auto")
    return backend


def set_attention(modules: list[nn.Module], backend: str) -> str:
    """Apply one attention processor to every diffusers Attention layer in `modules`; returns the backend used."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor

    backend = resolve_attention(backend)
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, Attention):
                layer.set_processor(XFormersAttnProcessor() if backend == "xformers" else AttnProcessor2_0())
    return backend

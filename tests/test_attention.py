"""The attention switch: xformers where it is usable, else one clear line; "auto" falls back to PyTorch SDPA."""
import pytest
from conftest import tiny_unet

from onestep.attention import resolve_attention, set_attention, xformers_available
from onestep.config import ConfigError, load_config

needs_no_xformers = pytest.mark.skipif(xformers_available(), reason="xformers is usable on this machine")


@needs_no_xformers
def test_xformers_without_xformers_is_one_clear_line():
    with pytest.raises(ValueError) as e:
        resolve_attention("xformers")
    message = str(e.value)
    assert "\n" not in message and "xformers" in message and "--attention sdpa or auto" in message
    with pytest.raises(ConfigError, match="^attention: attention 'xformers' needs"):  # what the trainer prints
        load_config(["--attention", "xformers"])


@needs_no_xformers
def test_auto_falls_back_to_sdpa_on_every_attention_layer():
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    assert resolve_attention("auto") == "sdpa"
    nets = [tiny_unet(None), tiny_unet(11)]
    for m in (m for net in nets for m in net.modules() if isinstance(m, Attention)):
        m.set_processor(AttnProcessor())  # start from another processor, so the switch has something to do
    assert set_attention(nets, "auto") == "sdpa"
    layers = [m for net in nets for m in net.modules() if isinstance(m, Attention)]
    assert layers and all(isinstance(m.processor, AttnProcessor2_0) for m in layers)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        resolve_attention("flash")


@pytest.mark.skipif(not xformers_available(), reason="needs xformers and a CUDA GPU")
def test_xformers_matches_sdpa_forward_and_backward_on_gpu():
    import torch
    from diffusers.models.attention_processor import Attention, XFormersAttnProcessor

    net = tiny_unet(11, size=16).cuda()
    x = torch.randn(4, 1, 16, 16, device="cuda")
    t, y = torch.tensor([10, 200, 500, 900], device="cuda"), torch.tensor([0, 3, 7, 10], device="cuda")
    outs = {}
    for backend in ("sdpa", "xformers"):
        assert set_attention([net], backend) == backend
        layers = [m for m in net.modules() if isinstance(m, Attention)]
        assert layers and all(isinstance(m.processor, XFormersAttnProcessor) == (backend == "xformers") for m in layers)
        net.zero_grad(set_to_none=True)
        out = net(x, t, class_labels=y).sample
        out.square().mean().backward()
        outs[backend] = out.detach(), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    for a, b in zip(outs["sdpa"], outs["xformers"]):
        assert (a - b).norm() / b.norm() < 1e-3


def test_xformers_build_without_kernels_counts_as_unavailable(tmp_path, monkeypatch):
    """A wheel built for another torch imports (with a warning) and then raises at its first call: 'auto' must
    take SDPA and 'xformers' must give the one-line error, instead of failing inside the first training step."""
    import sys

    import torch

    pkg = tmp_path / "xformers"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text(
        "def memory_efficient_attention(q, k, v):\n"
        "    raise NotImplementedError('No operator found for `memory_efficient_attention_forward`')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "xformers" or m.startswith("xformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: None)  # no CUDA tensor on this machine; the stand-in ignores it
    xformers_available.cache_clear()
    try:
        assert not xformers_available()
        assert resolve_attention("auto") == "sdpa"
        with pytest.raises(ValueError, match="^attention 'xformers' needs"):
            resolve_attention("xformers")
    finally:
        xformers_available.cache_clear()

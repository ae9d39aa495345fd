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

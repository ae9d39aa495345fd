"""Pluggable feature extractors for FID: clean-fid's Inception (its three modes), the digits network, any callable.

Every extractor takes images as floats holding 8-bit values, (B, C, H, W) in [0, 255] (what a saved PNG
holds, and clean-fid's own convention), resizes them the way its mode says, and returns (B, D) features.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import platform
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from .errors import OnestepError
from .schedule import to_device

INCEPTION_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
INCEPTION_ENV = "ONESTEP_INCEPTION_WEIGHTS"
# clean / legacy_tensorflow: clean-fid's TorchScript Inception; legacy_pytorch: pytorch-fid's state dict.
TS_NAME = "inception-2015-12-05.pt"
PT_NAME = "pt_inception-2015-12-05-6726825d.pth"


class FeatureError(OnestepError):
    """A feature extractor that cannot be built (unknown mode, missing weights)."""


@dataclass
class Extractor:
    """A named feature network: `fn` maps (B, channels, H, W) floats in [0, 255] (already resized) to (B, D)."""

    name: str
    mode: str
    channels: int
    fn: Callable[[torch.Tensor], torch.Tensor]
    resize: Callable[[np.ndarray], np.ndarray] | None = None  # clean-fid's per-image (H, W, C) resizer
    resize_batch: Callable[[torch.Tensor], torch.Tensor] | None = None  # the same on a batch, where it is faster
    head: Callable[[torch.Tensor], torch.Tensor] | None = None  # features -> class logits, if it classifies
    num_classes: int | None = None                               # the head's classes
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False  # inputs in NHWC layout (see `channels_last`)
    weights: str = ""  # a fingerprint of the network's weights, where two networks share a name (see `fingerprint`)
    image_size: tuple[int, int] | None = None  # the (H, W) the network takes, when it does not resize (None: any)
    dim: int | None = None  # the feature size D, where known before running it

    @property
    def meta(self) -> dict:
        """What a reference file must match."""
        return {"extractor": self.name, "mode": self.mode, **({"weights": self.weights} if self.weights else {})}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = match_channels(x.float(), self.channels)
        if self.resize_batch is not None and self.device.type == "cuda":  # on the GPU: no per-image CPU work
            x = self.resize_batch(to_device(x, self.device))
        elif self.resize is not None:
            x = torch.stack(list(_pool().map(self._resize_one, x.cpu().numpy())))
        x = to_device(x, self.device)
        return self.fn(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x).float()

    def _resize_one(self, im: np.ndarray) -> torch.Tensor:
        """clean-fid's per-image path: (C, H, W) -> (H, W, C) numpy -> its resizer -> (C, H', W') float."""
        return torch.from_numpy(np.ascontiguousarray(self.resize(im.transpose(1, 2, 0)).transpose(2, 0, 1))).float()


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """Threads for per-image resizing (PIL releases the GIL while it resizes)."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1)


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by repetition (PIL's convert('RGB')), RGB -> grey by PIL's ITU-R 601 luma."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3 and channels == 1:
        w = torch.tensor([19595, 38470, 7471], device=x.device).view(1, 3, 1, 1)  # PIL's fixed-point weights (/ 2^16)
        return (((x.round().long() * w).sum(1, keepdim=True) + 0x8000) >> 16).to(x.dtype)
    raise FeatureError(f"images have {x.shape[1]} channels; this extractor takes {channels} (1 and 3 convert); save "
                       "them as RGB or greyscale")


def input_problem(extractor: Extractor, shape, what: str = "this model makes",
                  fix: str = "use --features inception") -> str | None:
    """Why images of `shape` (C, H, W) (`what`: e.g. "teacher 'x' makes") cannot go through `extractor` (None: they
    can), before any sampling: a channel count other than 1 or 3 (or the extractor's), or a size it does not take."""
    shape = tuple(int(v) for v in shape)
    if shape[0] not in (extractor.channels, 1, 3):
        return (f"{what} {shape[0]}-channel images {shape}; {extractor.name} features take grey (1) or RGB (3) "
                "images, so FID cannot score them")
    if extractor.image_size is not None and shape[1:] != tuple(extractor.image_size):
        h, w = extractor.image_size
        return f"{extractor.name} features take {extractor.channels}x{h}x{w} images; {what} {shape}: {fix}"
    return None


def digits_extractor(classifier, device="cpu") -> Extractor:
    """The shipped digits network's penultimate features (1x8x8 digits, no resize); its head classifies."""
    from .fid import DigitsClassifier

    net = DigitsClassifier.load(classifier) if isinstance(classifier, str) else classifier
    net = net.to(device).eval()
    return Extractor("digits", "native", 1, lambda x: net.features(x / 127.5 - 1), head=net.head,
                     num_classes=net.config.num_classes, device=torch.device(device), weights=fingerprint(net),
                     image_size=(8, 8), dim=net.config.feature_dim)


def fingerprint(net: torch.nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over a network's state dict (names, dtypes, shapes, values)."""
    import hashlib

    items = sorted(net.state_dict().items())
    h = hashlib.sha256("".join(f"{name}:{t.dtype}:{tuple(t.shape)};" for name, t in items).encode())
    if items:  # one copy to the host for all values
        h.update(torch.cat([t.detach().contiguous().view(-1).view(torch.uint8) for _, t in items]).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def callable_extractor(fn: Callable[[torch.Tensor], torch.Tensor], name: str, channels: int = 3,
                       device="cpu") -> Extractor:
    """Any callable on (B, C, H, W) floats in [0, 255]; `name` goes into reference metadata."""
    return Extractor(name, "native", channels, fn, device=torch.device(device))


def channels_last(extractor: Extractor) -> Extractor:
    """The extractor with its network's weights and its inputs in channels-last (NHWC) layout, where convolutions may
    run faster (a GPU's tensor cores); the features change only by the convolutions' rounding. Converts the
    network in place; it must be an nn.Module (the Inception of `inception_extractor` is one when built from a weights
    file; clean-fid's own loader, without one, returns a plain function)."""
    if not isinstance(extractor.fn, torch.nn.Module):
        raise FeatureError(f"channels_last: the {extractor.name} extractor's network is not an nn.Module")
    extractor.fn.to(memory_format=torch.channels_last)
    return dataclasses.replace(extractor, channels_last=True)


def inception_extractor(mode: str = "clean", weights: str | None = None, device="cpu") -> Extractor:
    """clean-fid's Inception-v3 pool features (2048-d) in one of its modes, with its own resizer.

    weights: a local copy of the weights file (else $ONESTEP_INCEPTION_WEIGHTS, else clean-fid's usual
    place, downloading there when online). Offline and absent -> FeatureError naming the file and place.
    """
    from cleanfid.resize import build_resizer

    if mode not in INCEPTION_MODES:
        raise FeatureError(f"inception mode must be one of {', '.join(INCEPTION_MODES)}, got {mode!r}")
    from .runs import file_sha256

    dev = torch.device(device)
    path = weights or os.environ.get(INCEPTION_ENV) or None
    model = _build_inception(mode, path, dev)
    resize = None if mode == "legacy_tensorflow" else build_resizer(mode)
    file = path or default_weights_path(mode)  # the weights file the network was read from: its fingerprint
    return Extractor("inception_v3", mode, 3, model, resize=resize, device=dev,
                     resize_batch=pil_bicubic_resize if mode == "clean" else None, dim=2048,
                     weights=file_sha256(file)[:16] if os.path.isfile(file) else "")


@lru_cache(maxsize=16)
def _pil_bicubic_matrices(h: int, w: int, out_h: int, out_w: int, device: torch.device):
    """PIL's float ('F' mode) bicubic resize is separable and linear: a horizontal pass, then a vertical one. Its
    two matrices, read off PIL itself by resizing identity images one pass at a time (float64, on `device`)."""
    from PIL import Image

    rows = Image.fromarray(np.eye(w, dtype=np.float32), mode="F").resize((out_w, w), Image.BICUBIC)  # row i: x = e_i
    cols = Image.fromarray(np.eye(h, dtype=np.float32), mode="F").resize((h, out_h), Image.BICUBIC)
    return (torch.from_numpy(np.asarray(cols, dtype=np.float64)).to(device),   # (out_h, h)
            torch.from_numpy(np.asarray(rows, dtype=np.float64)).to(device))   # (w, out_w)


def pil_bicubic_resize(x: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """clean-fid's 'clean' resize (PIL bicubic per float channel, clipped to [0, 255]) of a (B, C, H, W) batch as two
    float64 matrix products on x's device, rounded to float32 between the passes as PIL stores them: equal to
    clean-fid's per-image resizer to float32 rounding (tested), without leaving the GPU."""
    cols, rows = _pil_bicubic_matrices(x.shape[-2], x.shape[-1], size[0], size[1], x.device)
    horizontal = (x.double() @ rows).float()
    return (cols @ horizontal.double()).float().clamp_(0, 255)


def default_weights_path(mode: str) -> str:
    """Where clean-fid looks for (and downloads) the weights of `mode`."""
    if mode == "legacy_pytorch":
        return os.path.join(torch.hub.get_dir(), "checkpoints", PT_NAME)
    return os.path.join("./" if platform.system() == "Windows" else "/tmp", TS_NAME)


def weights_url(mode: str) -> str:
    from cleanfid.downloads_helper import inception_url
    from cleanfid.inception_pytorch import FID_WEIGHTS_URL

    return FID_WEIGHTS_URL if mode == "legacy_pytorch" else inception_url


def missing_weights_message(mode: str, path: str | None) -> str:
    """One line: which file, from where, to put where."""
    fix = (f"download {weights_url(mode)} (on a machine with network) and put it at {default_weights_path(mode)}, "
           f"or pass --inception-weights FILE (or set {INCEPTION_ENV}=FILE)")
    if path:
        return f"Inception weights for mode {mode!r}: {path} does not exist; {fix}"
    return f"Inception weights for mode {mode!r} are not at {default_weights_path(mode)} and cannot be downloaded; {fix}"


def _build_inception(mode: str, path: str | None, device: torch.device):
    """clean-fid's network for `mode`: from `path` if given, else from where clean-fid keeps (or downloads) it."""
    from cleanfid.features import build_feature_extractor

    if path is None and not os.path.isfile(default_weights_path(mode)):
        from .loading import reachable

        if offline() or not reachable(weights_url(mode)):  # clean-fid's download has no timeout
            raise FeatureError(missing_weights_message(mode, None))
        try:
            return build_feature_extractor(mode, device, use_dataparallel=False)
        except (OSError, RuntimeError) as e:  # URLError, HTTP errors, a download cut off
            raise FeatureError(missing_weights_message(mode, None) + f" [{type(e).__name__}]") from None
    path = path or default_weights_path(mode)  # there already: read as a given file is (a broken one is named)
    if os.path.isdir(path):
        raise FeatureError(f"Inception weights for mode {mode!r}: {path} is a folder; pass the weights file itself "
                           f"({PT_NAME if mode == 'legacy_pytorch' else TS_NAME}, from {weights_url(mode)})")
    if not os.path.isfile(path):
        raise FeatureError(missing_weights_message(mode, path))
    try:
        return _inception_from_file(mode, path, device)
    except (RuntimeError, ValueError, OSError, KeyError, TypeError, AttributeError,
            pickle.UnpicklingError) as e:  # not the file clean-fid's loader expects (e.g. the other mode's)
        raise FeatureError(f"Inception weights for mode {mode!r}: {path} is not {PT_NAME if mode == 'legacy_pytorch' else TS_NAME} "
                           f"({type(e).__name__}); download {weights_url(mode)} and pass that file") from None


def offline() -> bool:
    """HF_HUB_OFFLINE set to a true value (as huggingface_hub reads it): nothing is downloaded."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _inception_from_file(mode: str, path: str, device: torch.device):
    from cleanfid.features import build_feature_extractor

    with tempfile.TemporaryDirectory() as tmp:  # a private folder where the file has the name clean-fid expects
        if mode == "legacy_pytorch":
            os.makedirs(os.path.join(tmp, "checkpoints"))
            os.symlink(os.path.abspath(path), os.path.join(tmp, "checkpoints", PT_NAME))
            old = torch.hub.get_dir()
            torch.hub.set_dir(tmp)
            try:
                return build_feature_extractor(mode, device, use_dataparallel=False)
            finally:
                torch.hub.set_dir(old)
        from cleanfid.inception_torchscript import InceptionV3W

        os.symlink(os.path.abspath(path), os.path.join(tmp, TS_NAME))
        return InceptionV3W(tmp, download=False, resize_inside=mode == "legacy_tensorflow").to(device).eval()

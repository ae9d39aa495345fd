"""Streaming feature statistics: images from a source, batch by batch, into float64 moments (no PNG round-trip).

A source maps sample indices to images in [-1, 1]: a generator callable (sample i: noise seed i, or under
evaluation seed s > 0 a hash of (s, i); label i % K), an exported OneStepPipeline folder, a folder of images or
an image tensor. Images are quantised to 8 bits as saving them would. Indices are split across processes (rank r takes r, r + P, ...)
and the results gathered with accelerate, so nothing depends on the batch size or the process count.
"""
from __future__ import annotations

import glob
import hashlib
import json
import numbers
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import OnestepError
from .features import Extractor
from .fid import FeatureStats
from .schedule import to_device

Sample = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class SourceError(OnestepError):
    """An image source that cannot be read (missing folder, no images)."""


def sample_seed(seed: int, i) -> int:
    """The noise seed of sample i under evaluation seed `seed`: i for seed 0, else a 32-bit hash of (seed, i) (torch's
    CPU generator keeps 32 bits of a seed), so two seeds draw different samples (seed + i would share all but one)."""
    if int(seed) == 0:
        return int(i)
    return int.from_bytes(hashlib.blake2b(f"{int(seed)}:{int(i)}".encode(), digest_size=4).digest(), "little")


@dataclass
class GeneratorSource:
    """`sample(z, labels)` -> images in [-1, 1]; sample i draws z from `sample_seed(seed, i)` and has label
    i % num_classes."""

    sample: Sample
    num_samples: int
    sample_shape: Sequence[int]
    num_classes: int | None = None
    seed: int = 0
    device: str | torch.device = "cpu"
    steps: int = 1  # the generator's own steps per sample (network evaluations), for reports
    image_shape: Sequence[int] | None = None  # (C, H, W) of the images `sample` returns, if not sample_shape (latents)
    iid = True  # samples in index order are independent draws: the first `keep` are a fair subset

    def __post_init__(self):
        for key, low in (("num_samples", 1), ("seed", 0), ("steps", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise SourceError(f"GeneratorSource {key} must be an integer >= {low}, got {v!r}")
        n = self.num_classes
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
            raise SourceError(f"GeneratorSource num_classes must be None or an integer >= 1, got {self.num_classes!r}")
        for key in ("sample_shape", "image_shape"):
            shape = getattr(self, key)
            if (shape is not None or key == "sample_shape") and len(tuple(shape)) != 3:
                raise SourceError(f"GeneratorSource {key} must be (C, H, W), got {tuple(shape)}")
        self.image_shape = tuple(self.sample_shape if self.image_shape is None else self.image_shape)

    def __len__(self) -> int:
        return self.num_samples

    def labels(self, idx: torch.Tensor) -> torch.Tensor | None:
        return idx % self.num_classes if self.num_classes else None

    def noise(self, idx: torch.Tensor) -> torch.Tensor:
        """The starting noise of samples `idx` (B, *sample_shape), on the source's device."""
        return to_device(torch.stack([torch.randn(*self.sample_shape, generator=torch.Generator().manual_seed(
            sample_seed(self.seed, i))) for i in idx]), self.device)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        y = self.labels(idx)
        return self.sample(self.noise(idx), None if y is None else to_device(y, self.device))


@dataclass
class TensorSource:
    """An image tensor (N, C, H, W) in [-1, 1] (e.g. `onestep.data.load_digits`), with optional labels."""

    images: torch.Tensor
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    def labels(self, idx: torch.Tensor) -> torch.Tensor | None:
        return None if self.targets is None else self.targets[idx]

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]


class FolderSource:
    """Image files under a folder (recursive, clean-fid's extensions and sorted order, .npy arrays included), read
    as grey or RGB 8-bit levels. Images of different sizes go through `resize` one by one (the extractor's per-image
    resizer: clean-fid's folder mode does the same), so a folder of photos of any sizes streams as clean-fid reads it."""

    levels = True  # returns the 8-bit values themselves (floats in [0, 255]): resized images are not re-quantised

    def __init__(self, path: str, channels: int = 3, resize: Callable[[np.ndarray], np.ndarray] | None = None):
        from cleanfid.utils import EXTENSIONS

        if os.path.isfile(path):
            raise SourceError(f"image folder {path!r} is a file; pass a folder of images")
        if not os.path.isdir(path):
            raise SourceError(f"image folder {path!r} does not exist")
        self.files = sorted(f for ext in EXTENSIONS for f in glob.glob(os.path.join(path, f"**/*.{ext}"), recursive=True))
        if not self.files:
            raise SourceError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {path!r}")
        self.channels, self.resize = channels, resize

    def __len__(self) -> int:
        return len(self.files)

    def labels(self, idx: torch.Tensor) -> None:
        return None

    def _read(self, path: str) -> np.ndarray:
        """(H, W, C) float32 8-bit levels."""
        from PIL import Image

        try:
            im = Image.fromarray(np.load(path)) if path.endswith(".npy") else Image.open(path)
            levels = np.asarray(im.convert("L" if self.channels == 1 else "RGB"), dtype=np.float32)  # decodes the file
        except (OSError, ValueError, TypeError, SyntaxError) as e:  # truncated or corrupt files fail here, not at open
            reason = str(e).splitlines()[0].replace(repr(path), "").replace(path, "").strip()[:100] if str(e) else ""
            raise SourceError(f"cannot read image {path!r} ({type(e).__name__}{': ' + reason if reason else ''}); "
                              "remove or replace that file (re-save or re-copy it)") from None
        return levels.reshape(*im.size[::-1], -1)

    def first_image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the first image, as read (C: the channels asked for; a folder's images may differ in size,
        unlike a GeneratorSource's image_shape)."""
        return (self.channels, *self._read(self.files[0]).shape[:2])

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        arrays = [self._read(self.files[int(i)]) for i in idx]
        if len({a.shape for a in arrays}) > 1 and self.resize is not None:
            self.resized = True  # a folder of several sizes (StreamResult.image_shape: None)
            arrays = [np.asarray(self.resize(a), dtype=np.float32) for a in arrays]
            arrays = [a.reshape(*a.shape[:2], -1) for a in arrays]
        i = next((i for i, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
        if i is not None:  # the first image whose size differs from the batch's first
            raise SourceError(f"images of different sizes ({os.path.basename(self.files[int(idx[0])])} "
                              f"{arrays[0].shape[1]}x{arrays[0].shape[0]}, {os.path.basename(self.files[int(idx[i])])} "
                              f"{arrays[i].shape[1]}x{arrays[i].shape[0]}) for an extractor that takes them as they "
                              "are; resize them to one size first")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _class_name(model_index: str) -> str:
    try:
        with open(model_index, encoding="utf-8") as f:
            name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise SourceError(f"{model_index} is not a readable JSON object; re-export the pipeline") from None
    return name if isinstance(name, str) else repr(name)


def _layout(path: str) -> dict:
    from .pipeline_multi import LAYOUT_FILE

    try:
        with open(os.path.join(path, LAYOUT_FILE), encoding="utf-8") as f:
            layout = json.load(f)
    except (OSError, ValueError):
        layout = None
    if not isinstance(layout, dict):
        raise SourceError(f"{os.path.join(path, LAYOUT_FILE)} is not a readable JSON object; re-export the pipeline")
    return layout


def is_text_pipeline(path: str, strict: bool = False) -> bool:
    """Whether the export at `path` is a text-to-image student (a stock Stable Diffusion (XL) pipeline, or a
    multi-student export of one), from its files; where they cannot be read False, or with `strict` the SourceError
    that says why."""
    from .pipeline_multi import LAYOUT_FILE
    from .prompt_sources import TEXT_PIPELINES

    try:
        if os.path.isfile(os.path.join(path, LAYOUT_FILE)):
            return _layout(path).get("conditioning") == "text"
        return _class_name(os.path.join(path, "model_index.json")) in TEXT_PIPELINES
    except (OSError, ValueError, SourceError):
        if strict:
            raise
        return False


def pipeline_source(path: str, num_samples: int, seed: int = 0, device="cpu", prompts=None) -> GeneratorSource:
    """An exported OneStepPipeline folder as a generator source (all of the student's steps), or a class-conditional
    multi-student export (MultiStudentPipeline: each sample through the student its label routes to); text-to-image
    exports (a stock Stable Diffusion (XL) pipeline, or a multi-student one) run on `prompts`
    (onestep.prompt_sources)."""
    from .multistudent import routed_sample
    from .pipeline import OneStepPipeline
    from .pipeline_multi import LAYOUT_FILE, MultiStudentPipeline
    from .prompt_sources import TEXT_PIPELINES, text_pipeline_source

    multi = os.path.isfile(os.path.join(path, LAYOUT_FILE))
    inner = os.path.join(path, "pipeline")
    if not multi and not os.path.isfile(os.path.join(path, "model_index.json")) and any(
            os.path.isfile(os.path.join(inner, f)) for f in ("model_index.json", LAYOUT_FILE)):
        raise SourceError(f"pipeline {path!r} is a run folder, not an exported pipeline; pass {inner!r} (the export "
                          "inside it)")
    if not multi and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise SourceError(f"pipeline {path!r} is not an exported OneStepPipeline folder (no model_index.json) nor a "
                          f"multi-student export (no {LAYOUT_FILE})")
    kind = "MultiStudentPipeline" if multi else _class_name(os.path.join(path, "model_index.json"))
    if kind not in ("OneStepPipeline", "MultiStudentPipeline") + TEXT_PIPELINES:
        raise SourceError(f"pipeline {path!r} is a {kind} export, not a onestep one (OneStepPipeline, a Stable "
                          "Diffusion (XL) student or a multi-student export); score a multi-step model as --teacher")
    text = is_text_pipeline(path, strict=True)
    from diffusers.utils import logging as dlog

    shown = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        if text:
            return text_pipeline_source(path, prompts, num_samples, seed, device, multi)
        if multi:
            mpipe = MultiStudentPipeline.from_pretrained(path)
            pipes = [p.to(device) for p in mpipe.pipes]
        else:
            pipes = [OneStepPipeline.from_pretrained(path).to(device)]
    finally:
        if shown:
            dlog.enable_progress_bar()
    gens = [p.student().eval() for p in pipes]
    sample = (lambda z, y: routed_sample([g.sample for g in gens], mpipe.router, z, y)) if multi else gens[0].sample
    cfg = pipes[0].unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return GeneratorSource(sample, num_samples, (cfg.in_channels, size, size), pipes[0].config.num_classes, seed,
                           device, gens[0].num_steps)


def to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the 8-bit values a PNG would store, as floats in [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def kept(source, keep: int) -> torch.Tensor:
    """Which samples' features to keep (bool, one per sample): the first `keep` of a source of independent draws
    (a generator), else a random subset of `keep` seeded by 0 (folders and tensors are often sorted by class)."""
    n = len(source)
    if keep <= 0 or keep >= n or getattr(source, "iid", False):
        return torch.arange(n) < keep
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:keep]] = True
    return mask


@dataclass
class StreamResult:
    """Gathered over all processes; `features` holds the kept samples' features (`kept`) in index order."""

    stats: FeatureStats
    features: np.ndarray | None
    predictions: np.ndarray | None  # predicted class of every sample (extractors with a head)
    labels: np.ndarray | None       # the source's label of every sample, if any
    sample_seconds: float           # time inside the source (sampling), summed over processes
    image_shape: tuple | None       # (C, H, W) of the source's images (None: several sizes)


@torch.no_grad()
def stream_features(source, extractor: Extractor, batch_size: int = 250, keep: int = 0,
                    accelerator=None) -> StreamResult:
    """Run `source` through `extractor` batch by batch into float64 moments; gather across processes."""
    from .features import input_problem

    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise SourceError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(source, GeneratorSource) and (problem := input_problem(
            extractor, source.image_shape, "the source makes", "pick features that take them, or resize the samples")):
        raise SourceError(problem)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if len(source) < world:  # every process knows: none waits in a gather that another never reaches
        raise SourceError(f"{len(source)} samples across {world} processes; use more samples or fewer processes")
    mine, keep_mask = torch.arange(rank, len(source), world), kept(source, keep)
    stats, feats, preds, clock, shapes = None, [], [], _SourceClock(extractor.device), set()
    for idx in mine.split(batch_size):  # nothing in the loop waits for the device but the kept features' copies
        with clock:
            try:
                x = source(idx)
            except SourceError as e:  # this process's share only (e.g. an unreadable image): each reports its own
                e.local = True
                raise
        f = extractor(x if getattr(source, "levels", False) else to_uint8_levels(x))
        stats = stats or FeatureStats(f.shape[1])
        shapes.add(tuple(x.shape[1:]))
        stats.update(f)
        if bool(keep_mask[idx].any()):
            feats.append(f[to_device(keep_mask[idx], f.device)].cpu())
        if extractor.head is not None:
            preds.append(extractor.head(f).argmax(1))
    feats = torch.cat(feats) if feats else torch.empty(0, stats.dim)
    pred, seconds = (torch.cat(preds).cpu() if preds else None), clock.seconds()
    if accelerator is not None and world > 1:
        stats, feats, pred, seconds = _gather(accelerator, stats, mine, keep_mask, feats, pred, seconds)
    # one size, else None (a folder of several sizes; this process's batches stand for all)
    shape = shapes.pop() if len(shapes) == 1 and not getattr(source, "resized", False) else None
    labels = source.labels(torch.arange(len(source)))
    return StreamResult(stats, feats.double().numpy() if keep else None, None if pred is None else pred.numpy(),
                        None if labels is None else labels.numpy(), seconds, shape)


class _SourceClock:
    """Time inside the source: the host's on a CPU; on a CUDA device the device's timeline between CUDA events
    around each call, read once at the end (timing adds no host waits; a host clock would count the device's
    queued work that a copy happened to wait for)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.host, self.events = 0.0, []

    def __enter__(self):
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record(torch.cuda.current_stream(self.device))
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.host += time.perf_counter() - self._t0
        if self.cuda:
            self.events[-1][1].record(torch.cuda.current_stream(self.device))

    def seconds(self) -> float:
        if not self.cuda:
            return self.host
        torch.cuda.synchronize(self.device)
        return sum(a.elapsed_time(b) for a, b in self.events) / 1000


def _gather(accelerator, stats: FeatureStats, mine: torch.Tensor, keep_mask: torch.Tensor, feats, pred, seconds):
    """Merge the moments of all processes (in rank order); gather kept features and predictions in index order."""
    dev, d = accelerator.device, stats.dim
    flat = torch.cat([torch.tensor([float(stats.n)], dtype=torch.float64), stats.mean.cpu(), stats.m2.cpu().ravel()])
    every = accelerator.gather(flat.to(dev)[None]).cpu()  # (processes, 1 + D + D^2)
    stats = FeatureStats(d)
    for row in every:
        stats.merge(int(row[0]), row[1:1 + d], row[1 + d:].view(d, d))
    seconds = accelerator.reduce(torch.tensor([seconds], dtype=torch.float64, device=dev), "sum").item()
    pred = None if pred is None else _gather_ordered(accelerator, mine, pred)
    feats = _gather_ordered(accelerator, mine[keep_mask[mine]], feats)
    return stats, feats, pred, seconds


def _gather_ordered(accelerator, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Gather per-process rows (with their sample indices) into one tensor in sample-index order."""
    from accelerate.utils import pad_across_processes

    dev = accelerator.device
    order = accelerator.gather(pad_across_processes(idx.to(dev), pad_index=-1)).cpu()
    rows = accelerator.gather(pad_across_processes(values.to(dev), pad_index=0)).cpu()
    valid = order >= 0
    return rows[valid][torch.argsort(order[valid])]

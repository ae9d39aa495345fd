"""Load a teacher from a local folder or a hub id: a diffusers pipeline folder, a folder with unet/ and
scheduler/ subfolders, or a bare model folder. Weights load from safetensors only; no remote code runs.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from .denoiser import Denoiser
from .errors import OnestepError
from .schedule import Schedule

BACKBONE_SUBFOLDERS = ("unet", "transformer")
SUPPORTED_BACKBONES = ("UNet2DModel", "UNet2DConditionModel")


class TeacherError(OnestepError):
    """A teacher that cannot be loaded or used, with a message that says how to fix it."""


@dataclass
class Teacher:
    """What a run needs of a teacher: its denoiser, scheduler config, sample shape and conditioning."""

    denoiser: Denoiser
    scheduler_config: dict
    path: str
    sample_shape: tuple[int, int, int]
    num_classes: int | None = None      # class-conditional teachers: labels 0..num_classes-1
    null_class: int | None = None       # the label that means "unconditional" (for guidance)
    info: dict = field(default_factory=dict)

    @property
    def backbone(self):
        return self.denoiser.backbone


def resolve_teacher_path(spec: str) -> str:
    """A local folder as is; a hub id ("org/name") from the local hub cache, downloading only when online."""
    if os.path.isdir(spec):
        return spec
    is_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith(".") and not os.path.isdir(spec.split("/")[0])
    if not is_hub_id:
        raise TeacherError(f"teacher path {spec!r} does not exist; pass a diffusers model folder or a hub id like "
                           "google/ddpm-cifar10-32")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return snapshot_download(spec, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(spec, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, no safetensors...
        raise TeacherError(
            f"could not get teacher {spec!r} from the hub ({type(e).__name__}); on a machine with network run "
            f"`huggingface-cli download {spec} --local-dir DIR` (safetensors weights), copy DIR here and pass "
            "--teacher DIR") from None


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load_teacher(spec: str, dtype: torch.dtype = torch.float32, device="cpu") -> Teacher:
    """Load a teacher as a Denoiser; raise TeacherError with a fix for anything unusable."""
    import diffusers

    root = resolve_teacher_path(spec)
    sub = next((s for s in BACKBONE_SUBFOLDERS if os.path.isfile(os.path.join(root, s, "config.json"))), None)
    model_dir = os.path.join(root, sub) if sub else root
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise TeacherError(f"{spec!r} holds no diffusers model: expected unet/config.json or config.json in {root}")
    cfg = _read_json(os.path.join(model_dir, "config.json"))
    name = cfg.get("_class_name", "")
    if name not in SUPPORTED_BACKBONES:
        raise TeacherError(f"teacher backbone {name or 'unknown'!r} is not supported; onestep distils "
                           f"{', '.join(SUPPORTED_BACKBONES)}")
    if not any(f.endswith(".safetensors") for f in os.listdir(model_dir)):
        raise TeacherError(f"no .safetensors weights in {model_dir}; onestep loads only safetensors (convert a .bin "
                           "with diffusers' save_pretrained(safe_serialization=True))")
    backbone = getattr(diffusers, name).from_pretrained(model_dir, use_safetensors=True, torch_dtype=dtype)
    backbone = backbone.to(device).eval().requires_grad_(False)

    sched_cfg = None
    for cand in (os.path.join(root, "scheduler", "scheduler_config.json"), os.path.join(root, "scheduler_config.json")):
        if os.path.isfile(cand):
            sched_cfg = _read_json(cand)
            break
    if sched_cfg is None:
        raise TeacherError(f"no scheduler config in {root}: add scheduler/scheduler_config.json (the teacher's "
                           "training schedule) next to the model")
    try:
        schedule = Schedule.from_scheduler_config(sched_cfg)
    except ValueError as e:
        raise TeacherError(f"teacher scheduler: {e}") from None

    extra = _read_json(os.path.join(root, "onestep.json")) if os.path.isfile(os.path.join(root, "onestep.json")) else {}
    num_classes = null_class = None
    if name == "UNet2DModel" and cfg.get("num_class_embeds"):
        null_class = extra.get("null_class")
        num_classes = extra.get("num_classes", cfg["num_class_embeds"] - (1 if null_class is not None else 0))
    size = cfg.get("sample_size", 32)
    size = size if isinstance(size, int) else size[0]
    shape = (cfg.get("in_channels", 3), size, size)
    null_cond = null_class
    denoiser = Denoiser(backbone, schedule, null_cond=null_cond)
    return Teacher(denoiser, sched_cfg, root, shape, num_classes, null_class, {"backbone": name, **extra})

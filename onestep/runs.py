"""Run-folder plumbing for the trainer: the folder itself, atomic checkpoints, sample grids, curves."""
from __future__ import annotations

import glob
import json
import os
import shutil

import torch

from .errors import OnestepError

CHECKPOINT_PREFIX = "step_"


class RunError(OnestepError):
    """A run folder that cannot be used as asked."""


def prepare_run_dir(path: str, *, overwrite: bool, resume: bool) -> None:
    """Create the run folder; refuse to reuse one that holds a run unless overwrite or resume is set."""
    used = os.path.isfile(os.path.join(path, "config.yaml"))
    if used and not (overwrite or resume):
        raise RunError(f"run folder {path} already holds a run; pass --overwrite to replace it, --resume latest "
                       "to continue it, or --name NEW for a new folder")
    if used and overwrite and not resume:
        for sub in ("checkpoints", "logs", "samples", "pipeline", "pipeline-ddim"):
            shutil.rmtree(os.path.join(path, sub), ignore_errors=True)
    os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)
    os.makedirs(os.path.join(path, "samples"), exist_ok=True)


def checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints (those with a manifest), oldest first."""
    found = glob.glob(os.path.join(run_dir, "checkpoints", CHECKPOINT_PREFIX + "*"))
    done = [d for d in found if os.path.isfile(os.path.join(d, "onestep_manifest.json"))]
    return sorted(done, key=lambda d: int(os.path.basename(d)[len(CHECKPOINT_PREFIX):]))


def resolve_resume(run_dir: str, resume: str) -> str | None:
    """'latest' -> newest complete checkpoint of the run (None if there is none); else the given folder."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume, "onestep_manifest.json")):
        raise RunError(f"resume: {resume!r} is not a complete onestep checkpoint (no onestep_manifest.json)")
    return resume


def save_checkpoint(accelerator, run_dir: str, step: int, keep: int, extra: dict) -> str:
    """accelerate save_state into a temporary folder, then rename into place; keep the newest `keep`."""
    final = os.path.join(run_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{step:07d}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "onestep_manifest.json"), "w") as f:
            json.dump({"step": step, **extra}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 4) -> None:
    """Save images in [-1, 1] as a PNG grid, upscaled by `scale` (nearest) so small samples are visible."""
    from torchvision.utils import save_image

    x = (images.float().clamp(-1, 1) + 1) / 2
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    save_image(x, path, nrow=nrow, padding=2, pad_value=1.0)


def plot_curve(points: list[dict], path: str) -> None:
    """fid_curve.png: FID against iteration and against wall-clock seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "step", "iteration"), (axes[1], "seconds", "wall-clock seconds")):
        ax.plot([p[key] for p in points], [p["fid"] for p in points], marker="o")
        ax.set_xlabel(label)
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

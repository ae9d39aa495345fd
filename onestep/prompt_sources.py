"""Text-to-image models as streaming sources: sample i has prompt i % P (P: the prompt list, e.g. a prompt file's
lines) and noise seed `sample_seed(seed, i)`, so the FID of a Stable Diffusion (XL) teacher or student streams as a
class-conditional one does, independent of the batch size and the process count.

Teachers run onestep's own sampler (`sample_teacher`: DDIM over the teacher's schedule, classifier-free guidance
against the empty prompt) on the prompts' cached embeddings and decode with their VAE. Exported students run as
stock diffusers runs them: the export's pipeline called with the keyword arguments its `onestep.json` records
(`pipeline_call`, the model card's call), a multi-student export through MultiStudentPipeline. A few-step student's
re-noising draws come from one generator per sample, seeded from (seed, i) apart from its starting noise.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .pipeline import CALL_FILE
from .streaming import GeneratorSource, SourceError

TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
CHUNK = 16  # images per pipeline call: a stock pipeline decodes its whole batch at once (VAE memory)


def renoise_generators(seed: int, idx: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample for the scheduler's re-noising, seeded from (seed, i) apart from its noise seed."""
    def seed_of(i: int) -> int:
        return int.from_bytes(hashlib.blake2b(f"renoise:{int(seed)}:{i}".encode(), digest_size=4).digest(), "little")
    return [torch.Generator().manual_seed(seed_of(int(i))) for i in idx]


@dataclass
class PromptSource(GeneratorSource):
    """`sample(z, rows, generators)` -> images in [-1, 1] for prompt rows `rows` (indices into `prompts`), starting
    noise z (B, *sample_shape) and one re-noising generator per sample; run CHUNK samples at a time. The label of
    sample i is its prompt's row, i % P."""

    prompts: Sequence[str] = ()
    nfe_per_step: int = 1  # network evaluations per step (2 under classifier-free guidance)

    def __post_init__(self):
        super().__post_init__()
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise SourceError("PromptSource prompts must be a non-empty list of strings")

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        return idx % len(self.prompts)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        z, rows, gens = self.noise(idx), self.labels(idx), renoise_generators(self.seed, idx)
        return torch.cat([self.sample(z[s:s + CHUNK], rows[s:s + CHUNK], gens[s:s + CHUNK])
                          for s in range(0, len(idx), CHUNK)])


def text_teacher_source(teacher, steps: int, guidance: float, num_samples: int, seed: int = 0,
                        device="cpu") -> PromptSource:
    """A text-to-image teacher (loaded with its prompts: onestep.loading.load_teacher(..., prompts=...)) sampled
    with DDIM in `steps` steps at guidance scale `guidance`, decoded by its VAE."""
    from .sampling import sample_teacher

    if not teacher.text_conditional:
        raise SourceError(f"teacher {teacher.path!r} is not a text-to-image model")

    def sample(z, rows, gens):
        x = sample_teacher(teacher.denoiser, z, teacher.prompt_embeds[rows].to(z.device), steps, guidance)
        return teacher.to_images(x)

    size = teacher.info["image_size"]
    return PromptSource(sample, num_samples, teacher.sample_shape, None, seed, device, steps, (3, size, size),
                        prompts=list(teacher.prompts))


def read_pipeline_call(path: str) -> dict:
    """The stock call's keyword arguments a text-to-image export records (onestep.json's pipeline_call)."""
    file = os.path.join(path, CALL_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            call = json.load(f)["pipeline_call"]
        if not isinstance(call, dict):
            raise TypeError
    except FileNotFoundError:
        raise SourceError(f"pipeline {path!r} has no {CALL_FILE} (the call a onestep export records): write "
                          f"{path}/{CALL_FILE} as {{\"pipeline_call\": {{...}}}} with the keyword arguments of the model "
                          "card's call (e.g. \"num_inference_steps\": 1, \"guidance_scale\": 1.0), or re-export it") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise SourceError(f"{file} holds no pipeline_call object; re-export the pipeline") from None
    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    steps, ts, scale = call.get("num_inference_steps", 1), call.get("timesteps"), call.get("guidance_scale", 1.0)
    known = not set(call) - {"num_inference_steps", "timesteps", "guidance_scale"}
    schedule = whole(steps) and steps >= 1 if ts is None else isinstance(ts, list) and ts and all(map(whole, ts))
    guidance = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale >= 0
    if not (known and schedule and guidance):
        raise SourceError(f"{file}: pipeline_call {call} is not a call onestep exports (num_inference_steps or "
                          "timesteps, and guidance_scale); re-export the pipeline")
    return call


def text_pipeline_source(path: str, prompts: Sequence[str] | None, num_samples: int, seed: int = 0, device="cpu",
                         multi: bool = False) -> PromptSource:
    """An exported text-to-image student (a stock StableDiffusion(XL)Pipeline folder, or a text-to-image
    multi-student export with `multi`) run on `prompts` as stock diffusers runs it."""
    from diffusers import DiffusionPipeline

    from .pipeline_multi import MultiStudentPipeline

    if not prompts:
        raise SourceError(f"pipeline {path!r} is a text-to-image student: pass prompts (--prompts FILE, one per line; "
                          "sample i uses prompt i % P)")
    if multi:
        runner = MultiStudentPipeline.from_pretrained(path).to(device)
        base, call = runner.base, runner.stock_call
    else:
        call = read_pipeline_call(path)
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
            xl = json.load(f).get("_class_name") == "StableDiffusionXLPipeline"  # no watermark: the student's pixels
        runner = base = DiffusionPipeline.from_pretrained(path, **({"add_watermarker": False} if xl else {})).to(device)
    base.set_progress_bar_config(disable=True)
    prompts = list(prompts)

    def sample(z, rows, gens):
        out = runner(prompt=[prompts[int(r)] for r in rows], latents=z, generator=gens, output_type="pt",
                     **({} if multi else call)).images
        return out.float() * 2 - 1

    cfg = base.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    steps = len(call["timesteps"]) if "timesteps" in call else int(call.get("num_inference_steps", 1))
    guided = call.get("guidance_scale", 1.0) > 1 and cfg.get("time_cond_proj_dim") is None  # diffusers' CFG rule
    return PromptSource(sample, num_samples, (cfg.in_channels, size, size), None, seed, device, steps,
                        (3, size * base.vae_scale_factor, size * base.vae_scale_factor), prompts=prompts,
                        nfe_per_step=2 if guided else 1)

"""Export speaks diffusers: `OneStepPipeline` runs a distilled student, and unconditional VP students
also export as a stock `DDIMPipeline` folder (trailing spacing: one step at t=999 equals x0 from eps).
"""
from __future__ import annotations

import json

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .denoiser import Denoiser
from .generator import Generator
from .schedule import Schedule


class OneStepPipeline(DiffusionPipeline):
    """Generate with a distilled one- (or few-) step student.

    Components: `unet` (the student backbone) and `scheduler` (the teacher's training schedule, which
    says how the backbone's prediction converts to an image). `timesteps` are the student's steps.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, timesteps: list | None = None, num_classes: int | None = None,
                 null_class: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(timesteps=timesteps, num_classes=num_classes, null_class=null_class)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    def student(self) -> Generator:
        """The student as a onestep Generator (same code path as training)."""
        schedule = Schedule.from_scheduler_config(dict(self.scheduler.config))
        den = Denoiser(self.unet, schedule, null_cond=self.config.null_class)
        return Generator(den, self.config.timesteps or None)

    @torch.no_grad()
    def __call__(self, class_labels: int | list[int] | torch.Tensor | None = None, batch_size: int = 1,
                 num_inference_steps: int | None = None, generator: torch.Generator | list | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        """Generate images; with class labels, one image per label (batch_size is then ignored)."""
        # 1. Check inputs
        num_classes = self.config.num_classes
        if class_labels is not None:
            if not num_classes:
                raise ValueError("this student is unconditional; call it without class_labels")
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"class labels must lie in 0..{num_classes - 1}, got {labels.tolist()}")
            batch_size = labels.numel()
        elif num_classes:
            raise ValueError(f"this student is class-conditional: pass class_labels (0..{num_classes - 1})")
        else:
            labels = None
        gen = self.student()
        steps = num_inference_steps or gen.num_steps
        if not 1 <= steps <= gen.num_steps:
            raise ValueError(f"num_inference_steps must be in 1..{gen.num_steps} for this student, got {steps}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")

        # 2. Prepare noise
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        shape = (batch_size, cfg.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")

        # 3. Run the student (re-noising between steps for few-step students)
        def noise(x):
            return randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)

        labels = None if labels is None else labels.to(self.device)
        image = gen.sample(latents.to(self.device), labels, steps, noise)

        # 4. Post-process
        image = self.image_processor.postprocess(image.clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def export_pipeline(generator: Generator, scheduler_config: dict, out_dir: str, *, num_classes: int | None = None,
                    null_class: int | None = None) -> list[str]:
    """Save the student as OneStepPipeline (out_dir) and, for unconditional VP one-step students, as a stock
    DDIMPipeline (out_dir + "-ddim"). Returns the folders written."""
    import diffusers

    sched = getattr(diffusers, scheduler_config.get("_class_name", "DDPMScheduler")).from_config(scheduler_config)
    unet = generator.denoiser.backbone
    timesteps = [float(t) if not float(t).is_integer() else int(t) for t in generator.timesteps]
    pipe = OneStepPipeline(unet=unet, scheduler=sched, timesteps=timesteps, num_classes=num_classes,
                           null_class=null_class)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    written = [out_dir]
    sch = generator.schedule
    if (num_classes is None and sch.kind == "vp" and generator.num_steps == 1
            and int(generator.timesteps[0]) == sch.num_train_timesteps - 1):
        ddim = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                         clip_sample=True, clip_sample_range=1.0)
        diffusers.DDIMPipeline(unet=unet, scheduler=ddim).save_pretrained(out_dir + "-ddim", safe_serialization=True)
        written.append(out_dir + "-ddim")
    return written


def model_card(metrics: dict, run_dir_name: str, has_ddim: bool) -> str:
    """A README.md for the export folder: what it is, how to load it, what was measured."""
    student, teacher = metrics.get("student", {}), metrics.get("teacher", {})
    cond = metrics.get("num_classes")
    call = "pipe(class_labels=[0, 1, 2, 3]).images" if cond else "pipe(batch_size=4).images"
    lines = [
        "---", "library_name: diffusers", "tags: [onestep, distillation, one-step]", "---", "",
        f"# One-step student distilled with onestep ({metrics.get('method')})", "",
        f"Teacher: `{metrics.get('teacher_path')}`; {metrics.get('steps')} training iterations.", "",
        "```python", "from onestep.pipeline import OneStepPipeline",
        f"pipe = OneStepPipeline.from_pretrained(\"{run_dir_name}/pipeline\")", f"images = {call}", "```", "",
    ]
    if has_ddim:
        lines += ["Stock diffusers, no onestep import, one step:", "", "```python",
                  "from diffusers import DDIMPipeline",
                  f"pipe = DDIMPipeline.from_pretrained(\"{run_dir_name}/pipeline-ddim\")",
                  "images = pipe(batch_size=4, num_inference_steps=1).images", "```", ""]
    lines += ["| model | NFE | FID | class accuracy |", "|---|---|---|---|",
              f"| teacher | {teacher.get('nfe')} | {_fmt(teacher.get('fid'))} | {_fmt(teacher.get('class_accuracy'))} |",
              f"| student | 1 | {_fmt(student.get('fid'))} | {_fmt(student.get('class_accuracy'))} |", "",
              f"FID features: {metrics.get('feature_extractor')}, {metrics.get('num_samples')} samples.", "",
              "```json", json.dumps({k: v for k, v in metrics.items() if k != "curve"}, indent=1), "```", ""]
    return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"

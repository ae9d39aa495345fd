"""Export speaks diffusers: `OneStepPipeline` runs a distilled student, and unconditional VP students
also export as a stock `DDIMPipeline` folder (trailing spacing: one step at t=999 equals x0 from eps).
Text-to-image students export as a stock `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`) with an
`LCMScheduler` whose one step runs at the student's t_init: LCM's last step returns its x0 estimate, which for an
eps-model is exactly the student's output (up to LCM's boundary scalings, c_skip < 3e-8 for t >= 300).
Its `onestep.json` records that call's keyword arguments (`pipeline_call`) for the streaming benchmark.
`onestep.nasa` adds negative-prompt steering (NASA) to such a stock pipeline at inference.
"""
import inspect
import json
import os
from typing import Optional

import diffusers
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .denoiser import Denoiser
from .generator import Generator
from .sampling import vp_betas
from .schedule import Schedule

CALL_FILE = "onestep.json"  # in a text-to-image export: {"pipeline_call": the stock call's keyword arguments}
LORA_FILE = "pytorch_lora_weights.safetensors"  # a LoRA generator's adapters alone (diffusers' default file name)


def class_label_tensor(class_labels, num_classes: int) -> torch.Tensor:
    """Class labels (an int, a list of ints or an integer tensor) as a 1-D long tensor, checked: at least one, each in
    0..num_classes - 1."""
    if isinstance(class_labels, (str, bytes)):
        raise ValueError(f"class_labels must be integers in 0..{num_classes - 1}, got the string {class_labels!r}")
    try:
        raw = torch.as_tensor(class_labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"class_labels must be integers in 0..{num_classes - 1}, got {class_labels!r}") from None
    if not raw.numel():
        raise ValueError("class_labels is empty; pass one label per image wanted")
    if raw.dtype == torch.bool or raw.is_floating_point() or raw.is_complex():
        raise ValueError(f"class_labels must be integers in 0..{num_classes - 1}, got {raw.dtype} values")
    labels = raw.long().reshape(-1)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"class labels must lie in 0..{num_classes - 1}, got {labels.tolist()}")
    return labels


class OneStepPipeline(DiffusionPipeline):
    """Generate with a distilled one- (or few-) step student.

    Components: `unet` (the student backbone) and `scheduler` (the teacher's training schedule, which
    says how the backbone's prediction converts to an image). `timesteps` are the student's steps.
    """

    model_cpu_offload_seq = "unet"

    # typing.Optional, evaluated: diffusers < 0.37 reads these annotations to check a loaded folder's values
    def __init__(self, unet, scheduler, timesteps: Optional[list] = None, num_classes: Optional[int] = None,
                 null_class: Optional[int] = None, clip_sample: Optional[float] = None):
        super().__init__()
        if unet is not None and "encoder_hidden_states" in inspect.signature(unet.forward).parameters:
            raise ValueError(f"OneStepPipeline runs pixel students; this {type(unet).__name__} takes text embeddings (a "
                             "text-to-image export): load its folder with diffusers' DiffusionPipeline.from_pretrained")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(timesteps=timesteps, num_classes=num_classes, null_class=null_class,
                                clip_sample=clip_sample)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    def student(self) -> Generator:
        """The student as a onestep Generator (same code path as training)."""
        schedule = Schedule.from_scheduler(self.scheduler)
        den = Denoiser(self.unet, schedule, null_cond=self.config.null_class)
        return Generator(den, self.config.timesteps or None, self.config.get("clip_sample"))

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
            labels = class_label_tensor(class_labels, num_classes)
            batch_size = labels.numel()
        elif num_classes:
            raise ValueError(f"this student is class-conditional: pass class_labels (0..{num_classes - 1})")
        else:
            labels = None
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        gen = self.student()
        steps = gen.num_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"num_inference_steps must be an integer in 1..{gen.num_steps}, got {steps!r}")
        if not 1 <= steps <= gen.num_steps:
            raise ValueError(f"num_inference_steps must be in 1..{gen.num_steps} for this student, got {steps}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"a list of generators needs one per image: {len(generator)} for a batch of {batch_size}")

        # 2. Prepare noise
        cfg, device = self.unet.config, self._execution_device
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        shape = (batch_size, cfg.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif not torch.is_tensor(latents):
            raise ValueError(f"latents must be a torch.Tensor of shape {shape}, got {type(latents).__name__}")
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")

        # 3. Run the student. A few-step student's re-noising between steps is drawn from `generator`, or without
        #    one from each image's own starting noise (onestep.generator.noise_from: what evaluation measures)
        def noise(x):
            return randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)

        labels = None if labels is None else labels.to(device)
        image = gen.sample(latents.to(device), labels, steps, None if generator is None else noise)

        # 4. Post-process
        image = self.image_processor.postprocess(image.clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


# DiffusionPipeline.from_pretrained(folder) looks model_index.json's _class_name up in diffusers' namespace: once this
# module is imported (`import onestep.pipeline`), the stock loader finds OneStepPipeline there too
if not hasattr(diffusers, "OneStepPipeline"):
    diffusers.OneStepPipeline = OneStepPipeline


def lcm_original_steps(t: int, num_train_timesteps: int) -> int | None:
    """The LCMScheduler `original_inference_steps` whose default one-step schedule is [t] (None if none is)."""
    found = [o for o in range(1, num_train_timesteps + 1) if o * (num_train_timesteps // o) - 1 == t]
    return None if not found else (50 if 50 in found else found[-1])


def stock_call_kwargs(generator: Generator) -> dict:
    """Keyword arguments of the stock pipeline call that runs an exported text-to-image student (no CFG: distilled in)."""
    sch, ts = generator.schedule, [int(t) for t in generator.timesteps]
    if len(ts) == 1 and lcm_original_steps(ts[0], sch.num_train_timesteps) is not None:
        return {"num_inference_steps": 1, "guidance_scale": 1.0}
    return {"timesteps": ts, "guidance_scale": 1.0}


STOCK_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # what DDIM / LCM schedulers build


def stock_betas(scheduler_config: dict, schedule: Schedule) -> dict:
    """Config overrides for a DDIM / LCM scheduler made from the teacher's: its betas written out where its
    beta_schedule is one those schedulers lack (DDPM's "sigmoid"), the zero-SNR rescale already in them."""
    if scheduler_config.get("trained_betas") is not None or \
            scheduler_config.get("beta_schedule", "linear") in STOCK_BETA_SCHEDULES:
        return {}
    return {"trained_betas": vp_betas(schedule), "rescale_betas_zero_snr": False}


def stock_call(generator: Generator) -> str:
    """The exact call, as text for the model card: pipe("a photo of a cat", ...)."""
    return 'pipe("a photo of a cat", ' + ", ".join(f"{k}={v!r}" for k, v in stock_call_kwargs(generator).items()) + ")"


def export_text_pipeline(generator: Generator, scheduler_config: dict, teacher_dir: str, out_dir: str,
                         lora: dict | None = None) -> str:
    """Save an SD / SDXL student as a stock StableDiffusionPipeline / StableDiffusionXLPipeline: the teacher's VAE,
    text encoder(s) and tokenizer(s), the student UNet, and an LCMScheduler whose one-step schedule is the
    student's t_init (where one can be). `lora` (a LoRA generator's adapters, Triad.generator_adapter_state): also
    saved alone in diffusers' LoRA format (LORA_FILE), which `load_lora_weights` puts on the teacher."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sch = generator.schedule
    if sch.kind != "vp" or sch.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"a stock Stable Diffusion export needs a VP teacher, got {sch}")
    if any(not float(t).is_integer() for t in generator.timesteps):
        raise ValueError(f"student timesteps must be integers for a stock export, got {generator.timesteps}")
    original = lcm_original_steps(int(generator.timesteps[0]), sch.num_train_timesteps) or 50
    known = inspect.signature(LCMScheduler.__init__).parameters  # the teacher's other keys (e.g. PNDM's skip_prk_steps)
    lcm_config = {k: v for k, v in scheduler_config.items() if k in known}  # would warn on every load
    lcm = LCMScheduler.from_config(lcm_config, original_inference_steps=original, clip_sample=False,
                                   thresholding=False, timestep_spacing="leading", steps_offset=1,
                                   **stock_betas(scheduler_config, sch))
    unet = generator.denoiser.backbone
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL (no watermarker: the student's own pixels)
        pipe = StableDiffusionXLPipeline.from_pretrained(teacher_dir, unet=unet, scheduler=lcm, use_safetensors=True,
                                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            teacher_dir, unet=unet, scheduler=lcm, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, use_safetensors=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if lora:
        type(pipe).save_lora_weights(out_dir, unet_lora_layers=lora, weight_name=LORA_FILE, safe_serialization=True)
    with open(os.path.join(out_dir, CALL_FILE), "w") as f:
        json.dump({"pipeline_call": stock_call_kwargs(generator)}, f, indent=1)
    return out_dir


def export_pipeline(generator: Generator, scheduler_config: dict, out_dir: str, *, num_classes: int | None = None,
                    null_class: int | None = None, text_teacher_dir: str | None = None,
                    lora: dict | None = None) -> list[str]:
    """Save the student as OneStepPipeline (out_dir) and, for unconditional VP one-step students, as a stock
    DDIMPipeline (out_dir + "-ddim"); text-to-image students (text_teacher_dir: the SD / SDXL teacher's folder) as
    a stock StableDiffusionPipeline / StableDiffusionXLPipeline (out_dir; with `lora`, also its LoRA file). Returns the
    folders written."""
    import diffusers

    if text_teacher_dir is not None:
        return [export_text_pipeline(generator, scheduler_config, text_teacher_dir, out_dir, lora)]

    sched = getattr(diffusers, scheduler_config.get("_class_name", "DDPMScheduler")).from_config(scheduler_config)
    unet = generator.denoiser.backbone
    timesteps = [float(t) if not float(t).is_integer() else int(t) for t in generator.timesteps]
    pipe = OneStepPipeline(unet=unet, scheduler=sched, timesteps=timesteps, num_classes=num_classes,
                           null_class=null_class, clip_sample=generator.clip_sample)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    written = [out_dir]
    sch = generator.schedule
    if (num_classes is None and sch.kind == "vp" and generator.num_steps == 1
            and int(generator.timesteps[0]) == sch.num_train_timesteps - 1):
        ddim = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                         clip_sample=True, clip_sample_range=generator.clip_sample or 1.0,
                                         thresholding=False,  # the student's clip, not the teacher's thresholding
                                         **stock_betas(scheduler_config, sch))
        diffusers.DDIMPipeline(unet=unet, scheduler=ddim).save_pretrained(out_dir + "-ddim", safe_serialization=True)
        written.append(out_dir + "-ddim")
    return written


def _exported_class(metrics: dict) -> str:
    """The pipeline class of the run's first export folder ("" if unknown)."""
    try:
        with open(os.path.join(metrics["export"][0], "model_index.json")) as f:
            return str(json.load(f).get("_class_name", ""))
    except (KeyError, IndexError, TypeError, OSError, ValueError):
        return ""


def _lora_lines(metrics: dict, run_dir_name: str, xl: bool) -> list[str]:
    """The model card's lines for a LoRA generator's adapter file in the export (none without one); the teacher
    loaded as the export was saved (SD: no safety checker; SDXL: no watermarker)."""
    folders = metrics.get("export") or []
    if not folders or not os.path.isfile(os.path.join(folders[0], LORA_FILE)):
        return []
    return [f"The student is a LoRA on the teacher; `{LORA_FILE}` holds it alone (diffusers' format, merged into this "
            "folder's UNet already), to load onto the teacher instead (where the student trained with the teacher in "
            "bf16 / fp16, this folder's UNet holds the teacher's weights as rounded so, and the two differ by that "
            "rounding):", "", "```python",
            "from diffusers import DiffusionPipeline, LCMScheduler",
            f"pipe = DiffusionPipeline.from_pretrained(\"{metrics.get('teacher_path')}\", "
            f"{'add_watermarker=False' if xl else 'safety_checker=None'})",
            f"pipe.load_lora_weights(\"{run_dir_name}/pipeline\")",
            f"pipe.scheduler = LCMScheduler.from_pretrained(\"{run_dir_name}/pipeline\", subfolder=\"scheduler\")",
            f"image = {metrics['pipeline_call']}.images[0]", "```", ""]


def model_card(metrics: dict, run_dir_name: str, has_ddim: bool) -> str:
    """A README.md for the export folder: what it is, how to load it, what was measured."""
    student, teacher = metrics.get("student", {}), metrics.get("teacher", {})
    cond, nfe = metrics.get("num_classes"), student.get("nfe") or 1
    call = "pipe(class_labels=[0, 1, 2, 3]).images" if cond else "pipe(batch_size=4).images"
    lines = [
        "---", "library_name: diffusers", "tags: [onestep, distillation, one-step]", "---", "",
        f"# {'One' if nfe == 1 else nfe}-step student distilled with onestep ({metrics.get('method')})", "",
        f"Teacher: `{metrics.get('teacher_path')}`; {metrics.get('steps')} training iterations.", "",
    ]
    if metrics.get("pipeline_call"):  # a stock text-to-image pipeline: no onestep import
        xl = "XL" in _exported_class(metrics)  # SDXL: no invisible watermark over the student's own pixels
        lines += [f"Stock diffusers, no onestep import, {nfe} network evaluation{'s' * (nfe > 1)} (guidance is "
                  "distilled in: keep `guidance_scale` at 1):", "", "```python", "from diffusers import DiffusionPipeline",
                  f"pipe = DiffusionPipeline.from_pretrained(\"{run_dir_name}/pipeline\""
                  f"{', add_watermarker=False' if xl else ''})",
                  f"image = {metrics['pipeline_call']}.images[0]", "```", "",
                  *_lora_lines(metrics, run_dir_name, xl),
                  "Negative prompts at inference (NASA, training-free; needs onestep): "
                  "`NASA(pipe)(\"a photo of a cat\", negative_prompt=\"blurry\", strength=0.04, ...)` with "
                  "`from onestep.nasa import NASA` and the call's other arguments as above.", ""]
    else:
        lines += ["```python", "from onestep.pipeline import OneStepPipeline",
                  f"pipe = OneStepPipeline.from_pretrained(\"{run_dir_name}/pipeline\")", f"images = {call}", "```", "",
                  "After `import onestep.pipeline`, diffusers' `DiffusionPipeline.from_pretrained` loads this folder too.", ""]
    if has_ddim:
        lines += ["Stock diffusers, no onestep import, one step:", "", "```python",
                  "from diffusers import DDIMPipeline",
                  f"pipe = DDIMPipeline.from_pretrained(\"{run_dir_name}/pipeline-ddim\")",
                  "images = pipe(batch_size=4, num_inference_steps=1).images", "```", ""]
    if metrics.get("feature_extractor"):  # FID was measured
        lines += ["| model | NFE | FID | class accuracy |", "|---|---|---|---|",
                  *([f"| teacher | {teacher.get('nfe')} | {format_figure(teacher.get('fid'))} | "
                     f"{format_figure(teacher.get('class_accuracy'))} |"] if teacher.get("fid") is not None else []),
                  f"| student | {nfe} | {format_figure(student.get('fid'))} | {format_figure(student.get('class_accuracy'))} |", "",
                  f"FID features: {metrics.get('feature_extractor')}, {metrics.get('num_samples')} samples.", ""]
    forgot = metrics.get("forgetting")
    if forgot:  # a forgetting method (SFD): what was forgotten, and how well
        override = forgot.get("override") or f"{forgot.get('override_mode')} override"
        lines += [f"**Forgotten conditions:** {forgot['forget']} (override: {override}); asked for them, the student "
                  "draws from the override instead.", ""]
        if "unlearning_accuracy" in forgot:
            lines += ["| unlearning accuracy | forget-class probability | remaining-class FID | remaining-class accuracy |",
                      "|---|---|---|---|", f"| {format_figure(forgot['unlearning_accuracy'])} | "
                      f"{format_figure(forgot['forget_class_probability'])} | {format_figure(forgot['remaining_fid'])} | "
                      f"{format_figure(forgot['remaining_class_accuracy'])} |", ""]
    lines += ["```json", json.dumps({k: v for k, v in metrics.items() if k != "curve"}, indent=1), "```", ""]
    return "\n".join(lines)


def format_figure(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"

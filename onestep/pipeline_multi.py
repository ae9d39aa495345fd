"""Export of a multi-student run: one folder holding K students and the router that picks one per condition.

    pipeline/multistudent.json                 what the folder holds (students, conditioning, stock call arguments)
    pipeline/router.json (+ router.safetensors) the router (onestep.multistudent.Router; k-means centroids)
    pipeline/student_k/                        class-conditional students: a OneStepPipeline folder each;
                                               text-to-image: student_0 is a stock Stable Diffusion (XL) pipeline,
                                               student_k (k >= 1) holds only its unet/ (VAE, text encoders shared)

`MultiStudentPipeline.from_pretrained(folder)(class_labels=[...])` (or `prompt=[...]`) routes each sample to its
student and returns the images in input order; one network evaluation per one-step sample.
"""
from __future__ import annotations

import json
import os

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .generator import Generator
from .multistudent import Router
from .pipeline import (OneStepPipeline, class_label_tensor, export_pipeline, export_text_pipeline, format_figure,
                       stock_call_kwargs)

LAYOUT_FILE = "multistudent.json"


def export_multi_pipeline(students: list[Generator], router: Router, scheduler_config: dict, out_dir: str, *,
                          num_classes: int | None = None, null_class: int | None = None,
                          text_teacher_dir: str | None = None) -> str:
    """Save K students and their router as one folder (layout above); returns the folder."""
    os.makedirs(out_dir, exist_ok=True)
    for k, gen in enumerate(students):
        sub = os.path.join(out_dir, f"student_{k}")
        if text_teacher_dir is None:
            export_pipeline(gen, scheduler_config, sub, num_classes=num_classes, null_class=null_class)
        elif k == 0:
            export_text_pipeline(gen, scheduler_config, text_teacher_dir, sub)
        else:
            gen.denoiser.backbone.save_pretrained(os.path.join(sub, "unet"), safe_serialization=True)
    _write_layout(out_dir, router, stock_call_kwargs(students[0]) if text_teacher_dir else None)
    return out_dir


def _write_layout(folder: str, router: Router, stock_call: dict | None) -> None:
    router.save(folder)
    layout = {"students": router.num_students, "conditioning": "class" if stock_call is None else "text",
              "stock_call_kwargs": stock_call}
    with open(os.path.join(folder, LAYOUT_FILE), "w") as f:
        json.dump(layout, f, indent=1)


class MultiStudentPipeline:
    """K students behind one call: each sample goes to the student its condition routes to, in input order.

    Class-conditional students are OneStepPipelines (`pipes`); text-to-image students share one stock Stable
    Diffusion (XL) pipeline (`base`) whose UNet is swapped per student (`unets`).
    """

    def __init__(self, router: Router, pipes: list | None = None, base=None, unets: list | None = None,
                 stock_call: dict | None = None):
        self.router, self.pipes, self.base, self.unets, self.stock_call = router, pipes, base, unets, stock_call or {}

    @property
    def num_students(self) -> int:
        return self.router.num_students

    @classmethod
    def from_pretrained(cls, folder: str) -> "MultiStudentPipeline":
        """Load the folder export_multi_pipeline wrote."""
        path = os.path.join(folder, LAYOUT_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{folder!r} is not a multi-student export (no {LAYOUT_FILE})")
        with open(path) as f:
            layout = json.load(f)
        router, k = Router.load(folder), layout["students"]
        if layout["conditioning"] == "class":
            return cls(router, [OneStepPipeline.from_pretrained(os.path.join(folder, f"student_{i}")) for i in range(k)])
        from diffusers import DiffusionPipeline, UNet2DConditionModel

        with open(os.path.join(folder, "student_0", "model_index.json")) as f:
            xl = "XL" in json.load(f).get("_class_name", "")
        base = DiffusionPipeline.from_pretrained(os.path.join(folder, "student_0"),  # SDXL: the students' own pixels
                                                 **({"add_watermarker": False} if xl else {}))
        unets = [base.unet] + [UNet2DConditionModel.from_pretrained(os.path.join(folder, f"student_{i}", "unet"))
                               for i in range(1, k)]
        return cls(router, base=base, unets=unets, stock_call=layout["stock_call_kwargs"])

    def save_pretrained(self, folder: str) -> None:
        """Write the folder from_pretrained reads (the layout export_multi_pipeline writes)."""
        for k in range(self.num_students):
            sub = os.path.join(folder, f"student_{k}")
            if self.pipes is not None:
                self.pipes[k].save_pretrained(sub, safe_serialization=True)
            elif k == 0:
                self.base.save_pretrained(sub, safe_serialization=True)
            else:
                self.unets[k].save_pretrained(os.path.join(sub, "unet"), safe_serialization=True)
        _write_layout(folder, self.router, None if self.pipes is not None else self.stock_call)

    def to(self, device) -> "MultiStudentPipeline":
        for m in (self.pipes or []) + (self.unets or []) + ([self.base] if self.base is not None else []):
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipes[0]._execution_device if self.pipes else self.base._execution_device

    def students(self) -> list[Generator]:
        """The class-conditional students as onestep Generators (index k: student k)."""
        return [p.student() for p in self.pipes]

    @torch.no_grad()
    def __call__(self, class_labels=None, prompt: str | list[str] | None = None, latents: torch.Tensor | None = None,
                 generator: torch.Generator | list | None = None, num_inference_steps: int | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """One image per class label (or prompt), each made by its own student; images in input order."""
        # 1. Check inputs and route
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if self.pipes is not None:
            if class_labels is None or prompt is not None:
                raise ValueError("these students are class-conditional: pass class_labels")
            cond = class_label_tensor(class_labels, self.pipes[0].config.num_classes)
        else:
            if prompt is None or class_labels is not None:
                raise ValueError("these students are text-to-image: pass prompt")
            if num_inference_steps is not None:
                raise ValueError(f"text-to-image students run the steps they were exported with ({self.stock_call}); "
                                 "call without num_inference_steps")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
            cond = self._encode(prompts)
        route = self.router.route(cond)
        if isinstance(generator, list) and len(generator) != len(cond):
            raise ValueError(f"a list of generators needs one per image: {len(generator)} for {len(cond)} images")

        # 2. Noise for the whole batch first, so sample i's starting noise does not depend on the routing. Few-step
        #    students re-noise from `generator` student by student as diffusers pipelines do (a list: each image's
        #    own, routing-independent), without one from each image's own starting noise (routing-independent)
        shape = (len(cond), *self._sample_shape())
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        elif not torch.is_tensor(latents):
            raise ValueError(f"latents must be a torch.Tensor of shape {shape}, got {type(latents).__name__}")
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")

        # 3. Each student on its own samples
        images = None
        for k in route.unique().tolist():
            m = (route == k).nonzero().squeeze(1)
            gen = [generator[i] for i in m.tolist()] if isinstance(generator, list) else generator
            x = self._run(k, cond[m], latents[m.to(latents.device)], gen, num_inference_steps)
            images = x.new_empty((len(cond), *x.shape[1:])) if images is None else images
            images[m.to(x.device)] = x

        # 4. Post-process (images in [0, 1])
        if output_type != "pt":
            images = VaeImageProcessor.pt_to_numpy(images.cpu())
            images = VaeImageProcessor.numpy_to_pil(images) if output_type == "pil" else images
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _sample_shape(self) -> tuple[int, int, int]:
        cfg = self.pipes[0].unet.config if self.pipes else self.base.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return cfg.in_channels, size, size

    def _run(self, k: int, cond: torch.Tensor, latents: torch.Tensor, generator, steps) -> torch.Tensor:
        if self.pipes is not None:
            return self.pipes[k](class_labels=cond, latents=latents, generator=generator, num_inference_steps=steps,
                                 output_type="pt").images
        from .denoiser import text_time_pooled_dim, unpack_text_time

        self.base.unet = self.unets[k]
        try:
            pooled = text_time_pooled_dim(dict(self.unets[k].config))
            cond = cond.to(self.device, self.base.unet.dtype)
            if pooled is None:
                kwargs = {"prompt_embeds": cond}
            else:
                parts = unpack_text_time(cond, pooled)
                kwargs = {"prompt_embeds": parts["encoder_hidden_states"],
                          "pooled_prompt_embeds": parts["added_cond_kwargs"]["text_embeds"]}
            return self.base(**kwargs, latents=latents, generator=generator, output_type="pt", **self.stock_call).images
        finally:
            self.base.unet = self.unets[0]

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompt conditions as training computed them (onestep.prompts), on the CPU."""
        from .prompts import encode_prompts, encode_prompts_xl

        if getattr(self.base, "text_encoder_2", None) is None:
            return encode_prompts(self.base.tokenizer, self.base.text_encoder, prompts)
        s = self.base.default_sample_size * self.base.vae_scale_factor
        time_ids = torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32)
        return encode_prompts_xl([self.base.tokenizer, self.base.tokenizer_2],
                                 [self.base.text_encoder, self.base.text_encoder_2], prompts, time_ids)


def model_card_multi(metrics: dict, run_dir_name: str) -> str:
    """A README.md for the multi-student export: the students, their conditions, how to call them, what was measured."""
    k, student, teacher = metrics["students"], metrics.get("student", {}), metrics.get("teacher", {})
    nfe = student.get("nfe") or 1
    call = "pipe(prompt=[\"a photo of a cat\", \"a red car\"]).images" if metrics.get("text_to_image") else \
        "pipe(class_labels=[0, 1, 2, 3]).images"
    together = ("of the students together (one shared fake score; each batch split among them)"
                if metrics.get("shared_fake_score") else "per student")
    lines = ["---", "library_name: diffusers", "tags: [onestep, distillation, one-step, multi-student]", "---", "",
             f"# {k} {'one' if nfe == 1 else nfe}-step students distilled with onestep ({metrics.get('method')}, "
             "multi-student)", "",
             f"Teacher: `{metrics.get('teacher_path')}`; {metrics.get('steps')} training iterations {together}. Each "
             f"sample is made by the one student its condition routes to ({metrics['router']['kind']} router): {nfe} "
             f"network evaluation{'s' * (nfe > 1)} per sample.", "",
             "```python", "from onestep.pipeline_multi import MultiStudentPipeline",
             f"pipe = MultiStudentPipeline.from_pretrained(\"{run_dir_name}/pipeline\")", f"images = {call}", "```", "",
             "| student | conditions | parameters |", "|---|---|---|"]
    lines += [f"| {r['student']} | {', '.join(map(str, r['conditions']))} | {r['parameters']:,} |"
              for r in metrics["per_student"]]
    lines += ["", f"Teacher parameters: {metrics['parameters']['teacher']:,}.", ""]
    if metrics.get("feature_extractor"):
        rows = [("teacher", teacher.get("nfe"), teacher), (f"{k} students", nfe, student)]
        lines += ["| model | NFE | FID | class accuracy |", "|---|---|---|---|"]
        lines += [f"| {name} | {nfe} | {format_figure(r['fid'])} | {format_figure(r.get('class_accuracy', 0))} |"
                  for name, nfe, r in rows if r.get("fid") is not None]  # no teacher row under --teacher_eval_steps []
        lines += ["", f"FID features: {metrics['feature_extractor']}, {metrics['num_samples']} samples.", ""]
    return "\n".join(lines)

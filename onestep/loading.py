"""Load a teacher from a local folder or a hub id: a diffusers pipeline folder, a folder with unet/ and
scheduler/ subfolders, or a bare model folder. Weights load from safetensors only; no remote code runs.

Stable Diffusion (1.x / 2.x) pipeline folders are text-to-image teachers in the VAE's latent space: the
text encoder runs once to cache the prompts' embeddings (conditions are embedding tensors (B, L, D), the
null condition is the empty prompt's embedding), and the VAE decodes samples to images.
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
PIPELINE_SKIP = ("safety_checker", "feature_extractor", "image_encoder")  # pipeline parts a teacher never needs


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
    prompts: list[str] | None = None    # text teachers: the prompts to distil on ...
    prompt_embeds: torch.Tensor | None = None  # ... and their cached embeddings (N, L, D), float32 on the CPU
    vae: torch.nn.Module | None = None  # latent teachers: the frozen VAE (decodes samples to images)
    latent_scale: float = 1.0           # latents the UNet sees = (VAE latents - latent_shift) * latent_scale
    latent_shift: float = 0.0

    @property
    def backbone(self):
        return self.denoiser.backbone

    @property
    def text_conditional(self) -> bool:
        return self.prompt_embeds is not None

    @torch.no_grad()
    def to_images(self, x: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Samples as images in [-1, 1] (B, 3, H, W) float32: VAE-decoded for latent teachers, else unchanged."""
        if self.vae is None:
            return x
        out = [self.vae.decode((z / self.latent_scale + self.latent_shift).to(self.vae.dtype)).sample.float()
               for z in x.split(batch_size)]
        return torch.cat(out)


def resolve_teacher_path(spec: str) -> str:
    """A local folder as is; a hub id ("org/name") from the local hub cache, downloading only when online."""
    if os.path.isdir(spec):
        return spec
    is_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith(".") and not os.path.isdir(spec.split("/")[0])
    if not is_hub_id:
        raise TeacherError(f"teacher path {spec!r} does not exist; pass a diffusers model folder or a hub id like "
                           "google/ddpm-cifar10-32")
    from huggingface_hub import hf_hub_download, snapshot_download

    def fetch(local_only: bool) -> str:
        allow, ignore = ["*.json", "*.safetensors", "*.txt", "*.model"], None
        try:  # a pipeline: only its components' folders, main weights only (no fp16 / non-EMA / single-file copies)
            with open(hf_hub_download(spec, "model_index.json", local_files_only=local_only)) as f:
                parts = [k for k, v in json.load(f).items() if isinstance(v, list) and v[0] and k not in PIPELINE_SKIP]
            allow = ["model_index.json"] + [f"{k}/*{ext}" for k in parts for ext in (".json", ".safetensors", ".txt", ".model")]
            ignore = ["*.fp16.safetensors", "*non_ema*"]
        except Exception:
            pass
        return snapshot_download(spec, allow_patterns=allow, ignore_patterns=ignore, local_files_only=local_only)

    try:
        return fetch(local_only=True)
    except Exception:
        pass
    try:
        return fetch(local_only=False)
    except Exception as e:  # offline, unknown repo, no safetensors...
        raise TeacherError(
            f"could not get teacher {spec!r} from the hub ({type(e).__name__}); on a machine with network run "
            f"`huggingface-cli download {spec} --local-dir DIR` (safetensors weights), copy DIR here and pass "
            "--teacher DIR") from None


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load_teacher(spec: str, dtype: torch.dtype = torch.float32, device="cpu", *, prompts: list[str] | None = None,
                 frozen_dtype: torch.dtype | None = None) -> Teacher:
    """Load a teacher as a Denoiser; raise TeacherError with a fix for anything unusable.

    Text-to-image teachers encode `prompts` (default: onestep.prompts.DEFAULT_PROMPTS) once; their VAE and
    text encoder are stored in `frozen_dtype` (default: `dtype`).
    """
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
    text = name == "UNet2DConditionModel"
    if text:
        _check_text_pipeline(root, cfg)
    elif prompts is not None:
        raise TeacherError(f"prompts: teacher {spec!r} is not a text-to-image model; remove --prompts")
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
    if text:
        return _load_text_teacher(root, backbone, schedule, sched_cfg, prompts, frozen_dtype or dtype, device)
    null_cond = null_class
    denoiser = Denoiser(backbone, schedule, null_cond=null_cond)
    return Teacher(denoiser, sched_cfg, root, shape, num_classes, null_class, {"backbone": name, **extra})


def _check_text_pipeline(root: str, unet_cfg: dict) -> None:
    """A UNet2DConditionModel teacher must come as a Stable Diffusion 1.x/2.x pipeline folder (SDXL: not yet)."""
    index_path = os.path.join(root, "model_index.json")
    index = _read_json(index_path) if os.path.isfile(index_path) else {}
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index or unet_cfg.get("addition_embed_type"):
        raise TeacherError(f"teacher {root!r} is an SDXL pipeline (added text/time conditioning), which onestep does "
                           "not support yet; use a Stable Diffusion 1.x or 2.x pipeline folder")
    missing = [k for k in ("vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(root, k))]
    if missing:
        raise TeacherError(f"a UNet2DConditionModel teacher needs a Stable Diffusion pipeline folder with unet/, vae/, "
                           f"text_encoder/, tokenizer/ and scheduler/; {root!r} lacks {', '.join(m + '/' for m in missing)}")
    for k in ("vae", "text_encoder"):
        if not any(f.endswith(".safetensors") for f in os.listdir(os.path.join(root, k))):
            raise TeacherError(f"no .safetensors weights in {os.path.join(root, k)}; onestep loads only safetensors "
                               "(re-save the pipeline with save_pretrained(safe_serialization=True))")


def _load_text_teacher(root, unet, schedule, sched_cfg, prompts, frozen_dtype, device) -> Teacher:
    """The SD teacher: UNet in VAE latent space, prompt embeddings cached once, the empty prompt as null condition."""
    import diffusers
    import transformers

    from .prompts import DEFAULT_PROMPTS, encode_prompts

    index_path = os.path.join(root, "model_index.json")
    index = _read_json(index_path) if os.path.isfile(index_path) else {}
    te_name = (index.get("text_encoder") or [None, "CLIPTextModel"])[1]
    tok_name = (index.get("tokenizer") or [None, "CLIPTokenizer"])[1]
    if "TextModel" not in te_name or not tok_name.endswith(("Tokenizer", "TokenizerFast")):
        raise TeacherError(f"text encoder {te_name!r} / tokenizer {tok_name!r} of {root!r} are not supported; "
                           "onestep reads CLIP text encoders (Stable Diffusion 1.x/2.x)")
    tokenizer = getattr(transformers, tok_name.removesuffix("Fast"), None) or getattr(transformers, tok_name)
    tokenizer = tokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # keep stderr to errors (a bad input is one line)
    try:
        text_encoder = getattr(transformers, te_name).from_pretrained(os.path.join(root, "text_encoder"),
                                                                      use_safetensors=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    text_encoder = text_encoder.to(device, frozen_dtype).eval().requires_grad_(False)
    prompts = list(prompts or DEFAULT_PROMPTS)
    embeds = encode_prompts(tokenizer, text_encoder, prompts)          # (N, L, D)
    null = encode_prompts(tokenizer, text_encoder, [""]).to(device)   # (1, L, D): the empty prompt
    del text_encoder  # run once: the export reloads it from the teacher folder

    vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(root, "vae"), use_safetensors=True, torch_dtype=frozen_dtype)
    vae = vae.to(device).eval().requires_grad_(False)
    if vae.config.latent_channels != unet.config.in_channels:
        raise TeacherError(f"the UNet of {root!r} takes {unet.config.in_channels} channels but the VAE makes "
                           f"{vae.config.latent_channels}; onestep distils text-to-image UNets (not inpainting ones)")
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    shape = (unet.config.in_channels, size, size)  # the latent; images are 2^(len(VAE blocks)-1) times larger
    image_size = size * 2 ** (len(vae.config.block_out_channels) - 1)
    denoiser = Denoiser(unet, schedule, null_cond=null)
    return Teacher(denoiser, sched_cfg, root, shape, info={"backbone": "UNet2DConditionModel", "text": True,
                                                            "image_size": image_size},
                   prompts=prompts, prompt_embeds=embeds, vae=vae, latent_scale=float(vae.config.scaling_factor),
                   latent_shift=float(vae.config.get("shift_factor") or 0.0))

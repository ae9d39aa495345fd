"""Load a teacher from a local folder or a hub id: a diffusers pipeline folder, a folder with unet/ and
scheduler/ subfolders, or a bare model folder. Weights load from safetensors only; no remote code runs.

Stable Diffusion (1.x / 2.x) and SDXL pipeline folders are text-to-image teachers in the VAE's latent space:
the text encoder(s) run once to cache the prompts' embeddings (conditions are embedding tensors (B, L, D); SDXL's
pooled embedding and size conditioning ride along as extra rows, denoiser.pack_text_time), the null condition is
the empty prompt's embedding (SDXL: zeros), and the VAE decodes samples to images and encodes real images.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .denoiser import Denoiser
from .errors import OnestepError
from .schedule import Schedule

BACKBONE_SUBFOLDERS = ("unet", "transformer")
SUPPORTED_BACKBONES = ("UNet2DModel", "UNet2DConditionModel")
PIPELINE_SKIP = ("safety_checker", "feature_extractor", "image_encoder")  # pipeline parts a teacher never needs
PIPELINE_PARTS = BACKBONE_SUBFOLDERS + ("scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                        "tokenizer_2")  # model_index.json entries that must be [library, class]


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
    prompt_embeds: PromptTable | None = None  # ... and their embeddings by row, as an (N, L, D) float32 CPU tensor
                                              # (SDXL: (N, L + r, D), denoiser.pack_text_time) (onestep.prompts)
    vae: torch.nn.Module | None = None  # latent teachers: the frozen VAE (decodes samples to images)
    latent_scale: float | torch.Tensor = 1.0  # latents the UNet sees = (VAE latents - latent_shift) * latent_scale;
    latent_shift: float | torch.Tensor = 0.0  # per channel (1, C, 1, 1) for VAEs with latents_mean / latents_std
    negative_cond: torch.Tensor | None = None   # text teachers: the negative prompt's embedding (1, ...) for guidance
    caption_embeds: PromptTable | None = None  # text teachers: embeddings of a dataset's captions (N_images, ...)

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
        scale, shift = _on(self.latent_scale, x), _on(self.latent_shift, x)
        out = [self.vae.decode((z / scale + shift).to(self.vae.dtype)).sample.float() for z in x.split(batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) as the teacher's samples (float32): VAE latents (the latent
        distribution's mode, scaled as the UNet sees them) for latent teachers, else unchanged."""
        if self.vae is None:
            return images.float()
        device = next(self.vae.parameters()).device
        scale, shift = (_on(v, torch.empty(0, device=device)) for v in (self.latent_scale, self.latent_shift))
        out = [(self.vae.encode(x.to(device, self.vae.dtype)).latent_dist.mode().float() - shift) * scale
               for x in images.split(batch_size)]
        return torch.cat(out)


def _on(value, like: torch.Tensor):
    """A float, or a per-channel tensor moved to `like`'s device as float32."""
    return value.to(like.device, torch.float32) if torch.is_tensor(value) else value


def latent_normalisation(vae_config) -> tuple:
    """(scale, shift) with UNet latents = (VAE latents - shift) * scale, as the diffusers pipelines decode them:
    per channel (latents_mean / latents_std, e.g. Playground v2.5's SDXL VAE), else scaling_factor / shift_factor."""
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
        return float(vae_config["scaling_factor"]) / std, mean
    return float(vae_config["scaling_factor"]), float(vae_config.get("shift_factor") or 0.0)


def resolve_teacher_path(spec: str) -> str:
    """A local folder as is; a hub id ("org/name") from the local hub cache, downloading only when online."""
    if os.path.isdir(spec):
        return spec
    if os.path.exists(spec):
        raise TeacherError(f"teacher path {spec!r} is a file; pass a diffusers model folder (with unet/ or "
                           "config.json) or a hub id like google/ddpm-cifar10-32")
    is_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith(".") and not os.path.isdir(spec.split("/")[0])
    if not is_hub_id:
        raise TeacherError(f"teacher path {spec!r} does not exist; pass a diffusers model folder or a hub id like "
                           "google/ddpm-cifar10-32")
    from huggingface_hub import hf_hub_download, snapshot_download

    def fetch(local_only: bool) -> str:
        try:
            with open(hf_hub_download(spec, "model_index.json", local_files_only=local_only)) as f:
                index = json.load(f)
        except Exception:
            index = None
        allow, ignore = hub_patterns(index)
        path = snapshot_download(spec, allow_patterns=allow, ignore_patterns=ignore, local_files_only=local_only)
        if local_only and not snapshot_complete(path):  # e.g. a cache of from_pretrained(variant="fp16"): download
            raise FileNotFoundError(f"{path} lacks the weights or configs a teacher needs")
        return path

    try:
        return fetch(local_only=True)
    except Exception:
        pass
    from huggingface_hub import constants

    try:
        if constants.HF_HUB_OFFLINE:  # the cache was all there is, and it lacks the teacher
            raise ConnectionError
        _reach_hub()
        return fetch(local_only=False)
    except Exception as e:  # offline, unknown repo, no safetensors...
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else type(e).__name__
        raise TeacherError(
            f"could not get teacher {spec!r} from the hub ({why}); on a machine with network run "
            f"`huggingface-cli download {spec} --local-dir DIR` (safetensors weights), copy DIR here and pass "
            "--teacher DIR") from None


HUB_FILES = (".json", ".safetensors", ".txt", ".model")
ROOT_FILES = ["config.json", "scheduler_config.json", "onestep.json", "diffusion_pytorch_model.safetensors",
              "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-*.safetensors"]


def hub_patterns(index: dict | None) -> tuple[list[str], list[str] | None]:
    """(allow, ignore) patterns of a hub teacher's download, from its model_index.json (None: a model repo): a
    pipeline's components' folders, and the files diffusers reads from the repo's root where a component has no
    folder (google/ddpm-cifar10-32 keeps its UNet and scheduler there); main weights only (no fp16 / non-EMA /
    single-file copies)."""
    if not isinstance(index, dict):
        return [f"*{ext}" for ext in HUB_FILES], None
    parts = _index_parts(index)
    allow = ["model_index.json", *ROOT_FILES] + [f"{k}/*{ext}" for k in parts for ext in HUB_FILES]
    return allow, ["*.fp16.safetensors", "*non_ema*"]


def _index_parts(index: dict) -> list[str]:
    """The components of a pipeline's model_index.json that a teacher reads (no safety checker and the like)."""
    return [k for k, v in index.items() if isinstance(v, list) and v and v[0] and k not in PIPELINE_SKIP]


def snapshot_complete(root: str) -> bool:
    """Whether a downloaded (or cached) teacher folder holds what load_teacher reads: the backbone's config and
    safetensors weights, a scheduler config, and the weights / files of each pipeline component."""
    def has(folder, *names):
        return os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, n)) for n in names)

    def weights(folder, name):
        return has(folder, name, name + ".index.json")

    scheduler = has(root, "scheduler_config.json") or has(os.path.join(root, "scheduler"), "scheduler_config.json")
    if has(root, "config.json"):
        return scheduler and weights(root, "diffusion_pytorch_model.safetensors")
    parts = _index_parts(_read_json(os.path.join(root, "model_index.json")) if has(root, "model_index.json") else {})
    if not scheduler or not any(weights(os.path.join(root, k), "diffusion_pytorch_model.safetensors")
                                for k in BACKBONE_SUBFOLDERS):
        return False
    for k in parts:
        folder = os.path.join(root, k)
        if k.startswith("text_encoder") and not weights(folder, "model.safetensors"):
            return False
        if k.startswith(("vae", *BACKBONE_SUBFOLDERS)) and not weights(folder, "diffusion_pytorch_model.safetensors"):
            return False
        if k.startswith("tokenizer") and not (os.path.isdir(folder) and os.listdir(folder)):
            return False
    return True


def _reach_hub() -> None:
    """Fail at once where the hub cannot be reached (instead of the hub client's retries)."""
    from huggingface_hub import constants

    if not reachable(constants.ENDPOINT):
        raise ConnectionError(f"{constants.ENDPOINT} cannot be reached")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether `url`'s host accepts a connection within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_json(path: str) -> dict:
    """A teacher folder's JSON file as a dict; a file that is unreadable, not JSON or not a JSON object is one
    TeacherError line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TeacherError(f"teacher: {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix "
                           "that file or re-save the teacher with save_pretrained") from None
    except UnicodeDecodeError as e:
        raise TeacherError(f"teacher: {path} is not valid JSON (not UTF-8 text at byte {e.start}); fix that file or "
                           "re-save the teacher with save_pretrained") from None
    except OSError as e:
        raise TeacherError(f"teacher: cannot read {path} ({type(e).__name__}: {_first_line(e)}); fix that file or "
                           "re-save the teacher with save_pretrained") from None
    if not isinstance(data, dict):
        raise TeacherError(f"teacher: {path} holds a JSON {type(data).__name__}, not an object ({{...}}); fix that "
                           "file or re-save the teacher with save_pretrained")
    return data


def _first_line(e, limit: int = 150) -> str:
    line = (str(e).strip().splitlines() or [""])[0].strip()
    return line if len(line) <= limit else line[:limit - 3] + "..."


@contextmanager
def _loading(component: str, folder: str):
    """Report a component that cannot be loaded (truncated / mismatched weights, a broken config or tokenizer) as
    one TeacherError line; onestep's own errors pass unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except OnestepError:
        raise
    except (OSError, ValueError, SafetensorError, RuntimeError, TypeError, KeyError, OverflowError,
            AttributeError) as e:  # OSError is EnvironmentError, ValueError covers json.JSONDecodeError
        cause = e  # a corrupt weights file: the loaders re-raise safetensors' own error as a vaguer one
        while cause is not None and not isinstance(cause, SafetensorError):
            cause = cause.__cause__ or cause.__context__
        cause = cause or e
        reason = _first_line(str(cause).replace(folder + os.sep, ""))
        if "above report" in reason:  # transformers' size-mismatch error points at a table it logged (silenced here)
            reason = "the weights' shapes do not fit its config.json"
        raise TeacherError(f"teacher: cannot load {component} from {folder} ({type(cause).__name__}: {reason}); "
                           "re-save it with save_pretrained(safe_serialization=True) or fix that file") from None


def _check_weights(folder: str, weights: str, fix: str) -> None:
    """`weights` (safetensors, or its shard index) in `folder`, else one TeacherError line saying what is there."""
    files = os.listdir(folder)
    if weights in files or weights + ".index.json" in files:
        return
    found = sorted(f for f in files if f.endswith(".safetensors"))
    if not found:
        raise TeacherError(f"no .safetensors weights in {folder}; onestep loads only safetensors ({fix})")
    raise TeacherError(f"teacher: {folder} holds {', '.join(found)} but no {weights}; rename the weights file to "
                       f"{weights} or re-save it with save_pretrained(safe_serialization=True)")


def _read_index(root: str) -> dict:
    """model_index.json of a pipeline folder ({} if none), its components checked to be [library, class] pairs."""
    path = os.path.join(root, "model_index.json")
    if not os.path.isfile(path):
        return {}
    index = _read_json(path)
    for key, value in index.items():
        if key not in PIPELINE_PARTS and not os.path.isdir(os.path.join(root, key)):
            continue  # pipeline options (_class_name, force_zeros_for_empty_prompt, timesteps, ...)
        pair = isinstance(value, (list, tuple)) and len(value) == 2
        if not (pair and all(v is None or isinstance(v, str) for v in value)):
            raise TeacherError(f"teacher: {path}: entry {key!r} is {json.dumps(value)}, not a [library, class] pair "
                               f"(e.g. [\"transformers\", \"CLIPTextModel\"]); fix that file or re-save the pipeline "
                               "with save_pretrained")
    return index


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_scheduler_config(cfg: dict, path: str, indexed=None) -> None:
    """The keys a schedule is built from, checked before diffusers sees them; the class named by the pipeline's
    model_index.json (`indexed`: [library, class]), which stock diffusers would load, must be the config's."""
    name = cfg.get("_class_name")
    if name is None and any(k in cfg for k in ("sigma_min", "sigma_max", "sigma_data")):
        raise TeacherError(f"teacher: {path} has EDM keys (sigma_min, sigma_max, sigma_data) but no _class_name, so it "
                           "would be read as a DDPM schedule; add \"_class_name\": \"EDMEulerScheduler\" (or the "
                           "scheduler it was trained with)")
    if isinstance(indexed, (list, tuple)) and len(indexed) == 2 and isinstance(indexed[1], str) and name and \
            indexed[1] != name:
        raise TeacherError(f"teacher: model_index.json names the scheduler {indexed[1]} but {path} is a {name}; make "
                           "them agree (diffusers loads the model_index.json class with that config)")
    if cfg.get("timestep_type") == "continuous" and not str(name).startswith("EDM"):
        raise TeacherError(f"teacher: {path}: timestep_type \"continuous\" conditions the UNet on 0.25 ln(sigma), "
                           "which onestep does not read (it feeds VP teachers integer timesteps); use a teacher with "
                           "discrete timesteps")
    if cfg.get("rescale_betas_zero_snr") and cfg.get("prediction_type", "epsilon") == "epsilon":
        raise TeacherError(f"teacher: {path}: zero terminal SNR (rescale_betas_zero_snr) with epsilon prediction "
                           "has no x0 at the last timestep; such teachers predict v (set prediction_type "
                           "\"v_prediction\" if it was trained so)")
    steps = cfg.get("num_train_timesteps", 1000)
    if not _is_int(steps) or steps < 1:
        raise TeacherError(f"teacher: {path}: num_train_timesteps must be an integer >= 1, got {steps!r}; fix that "
                           "file (the teacher's training schedule, e.g. 1000)")
    for key in ("beta_start", "beta_end"):
        value = cfg.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TeacherError(f"teacher: {path}: {key} must be a number, got {json.dumps(value)}; fix that file "
                               "(e.g. beta_start 0.0001, beta_end 0.02)")


def _class_labels(extra: dict, num_embeds: int, path: str) -> tuple[int, int | None]:
    """(num_classes, null_class) of a class-conditional UNet: labels 0..num_classes-1 and the null class (if any,
    another label) must be rows of its class embedding (num_embeds rows)."""
    null_class = extra.get("null_class")
    num_classes = extra.get("num_classes", num_embeds - (1 if null_class is not None else 0))
    problem = None
    if null_class is not None and (not _is_int(null_class) or not 0 <= null_class < num_embeds):
        problem = f"null_class must be null or an integer in 0..{num_embeds - 1}, got {null_class!r}"
    elif not _is_int(num_classes) or num_classes < 1:
        problem = f"num_classes must be an integer >= 1, got {num_classes!r}"
    elif num_classes + (1 if null_class is not None else 0) > num_embeds:
        problem = f"{num_classes} classes" + (" and a null class" if null_class is not None else "") + " do not fit"
    elif null_class is not None and null_class < num_classes:
        problem = f"null_class {null_class} is one of the labels 0..{num_classes - 1}"
    if problem:
        raise TeacherError(f"teacher: {path}: {problem} (the UNet has num_class_embeds {num_embeds}); fix that file "
                           f"(e.g. {{\"num_classes\": {num_embeds - 1}, \"null_class\": {num_embeds - 1}}}) or delete "
                           f"it to use all {num_embeds} classes without a null class")
    return num_classes, null_class


def _backbone_config(spec: str, root: str) -> tuple[str | None, str, dict]:
    """(subfolder or None, model folder, config) of the teacher's backbone."""
    sub = next((s for s in BACKBONE_SUBFOLDERS if os.path.isfile(os.path.join(root, s, "config.json"))), None)
    model_dir = os.path.join(root, sub) if sub else root
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise TeacherError(f"{spec!r} holds no diffusers model: expected unet/config.json or config.json in {root}")
    return sub, model_dir, _read_json(os.path.join(model_dir, "config.json"))


def is_text_teacher(spec: str) -> bool:
    """Whether the teacher at `spec` (folder or hub id) is text-to-image (a UNet2DConditionModel), from its configs;
    False where they cannot be read (load_teacher then says why)."""
    try:
        return _backbone_config(spec, resolve_teacher_path(spec))[2].get("_class_name") == "UNet2DConditionModel"
    except TeacherError:
        return False


def load_teacher(spec: str, dtype: torch.dtype = torch.float32, device="cpu", *, prompts: list[str] | None = None,
                 frozen_dtype: torch.dtype | None = None, captions: list[str] | None = None,
                 negative_prompt: str = "") -> Teacher:
    """Load a teacher as a Denoiser; raise TeacherError with a fix for anything unusable.

    Text-to-image teachers encode `prompts` (default: `captions`, else onestep.prompts.DEFAULT_PROMPTS) and a
    dataset's `captions` into prompt tables (onestep.prompts.PromptTable: cached, or encoded as drawn), the empty and
    the `negative_prompt` once; their VAE and text encoders are stored in `frozen_dtype`
    (default: `dtype`). Other teachers ignore `captions`.
    """
    import diffusers

    root = resolve_teacher_path(spec)
    index = _read_index(root)
    if index.get("_class_name") in ("OneStepPipeline", "MultiStudentPipeline") or os.path.isfile(
            os.path.join(root, "multistudent.json")):
        raise TeacherError(f"teacher {spec!r} is an exported one-step student, not a multi-step teacher; pass the "
                           "teacher it was distilled from (its README.md names it)")
    sub, model_dir, cfg = _backbone_config(spec, root)
    name = cfg.get("_class_name", "")
    if name not in SUPPORTED_BACKBONES:
        raise TeacherError(f"teacher backbone {name or 'unknown'!r} is not supported; onestep distils "
                           f"{', '.join(SUPPORTED_BACKBONES)}")
    _check_backbone_io(spec, name, cfg)
    text = name == "UNet2DConditionModel"
    if text:
        _check_text_pipeline(root, cfg)
    elif prompts is not None:
        raise TeacherError(f"prompts: teacher {spec!r} is not a text-to-image model; remove --prompts")
    elif negative_prompt:
        raise TeacherError(f"negative_prompt: teacher {spec!r} is not a text-to-image model; remove --negative_prompt")
    _check_weights(model_dir, "diffusion_pytorch_model.safetensors",
                   "convert a .bin with diffusers' save_pretrained(safe_serialization=True)")
    with _loading(sub or "the model", model_dir):
        backbone = getattr(diffusers, name).from_pretrained(model_dir, use_safetensors=True, torch_dtype=dtype)
    backbone = backbone.to(device).eval().requires_grad_(False)

    sched_path = next((c for c in (os.path.join(root, "scheduler", "scheduler_config.json"),
                                   os.path.join(root, "scheduler_config.json")) if os.path.isfile(c)), None)
    if sched_path is None:
        raise TeacherError(f"no scheduler config in {root}: add scheduler/scheduler_config.json (the teacher's "
                           "training schedule) next to the model")
    sched_cfg = _read_json(sched_path)
    _check_scheduler_config(sched_cfg, sched_path, index.get("scheduler"))
    try:
        schedule = Schedule.from_scheduler_config(sched_cfg)
    except (ValueError, TypeError, NotImplementedError, ImportError) as e:  # ImportError: a scheduler's missing extra
        raise TeacherError(f"teacher scheduler ({sched_path}): {_first_line(e)}") from None

    extra_path = os.path.join(root, "onestep.json")
    extra = _read_json(extra_path) if os.path.isfile(extra_path) else {}
    num_classes = null_class = None
    if name == "UNet2DModel" and backbone.config.num_class_embeds:
        num_classes, null_class = _class_labels(extra, backbone.config.num_class_embeds, extra_path)
    size = square_size(cfg.get("sample_size", 32), root)
    shape = (cfg.get("in_channels", 3), size, size)
    if text:
        return _load_text_teacher(root, backbone, schedule, sched_cfg, prompts, frozen_dtype or dtype, device,
                                  captions, negative_prompt)
    null_cond = null_class
    denoiser = Denoiser(backbone, schedule, null_cond=null_cond)
    return Teacher(denoiser, sched_cfg, root, shape, num_classes, null_class, {"backbone": name, **extra})


def _check_backbone_io(spec: str, name: str, cfg: dict) -> None:
    """What a teacher's UNet takes and predicts: a sample-shaped prediction (no learned variance, no inpainting or
    upscaling inputs), and as its condition class labels of an embedding table (UNet2DModel) or text alone."""
    c_in = cfg.get("in_channels", 3 if name == "UNet2DModel" else 4)
    c_out = cfg.get("out_channels", c_in)
    if c_in != c_out:
        raise TeacherError(f"the UNet of {spec!r} takes {c_in} channels and predicts {c_out}; onestep distils teachers "
                           "whose prediction has the sample's shape (no learned variance, no inpainting or upscaling "
                           "inputs)")
    embed, rows = cfg.get("class_embed_type"), cfg.get("num_class_embeds")
    if name == "UNet2DModel" and embed is not None and rows is None:
        raise TeacherError(f"the UNet of {spec!r} takes class embeddings of type {embed!r} without an embedding "
                           "table; onestep conditions UNet2DModel teachers on integer labels (num_class_embeds)")
    if name == "UNet2DConditionModel" and (embed is not None or rows is not None):
        raise TeacherError(f"the UNet of {spec!r} takes class labels besides text (class_embed_type {embed!r}, "
                           f"num_class_embeds {rows!r}), as upscalers and unCLIP models do; onestep distils text-to-"
                           "image UNets (Stable Diffusion 1.x / 2.x, SDXL)")


def square_size(sample_size, root: str) -> int:
    """A UNet config's sample_size as one side; non-square samples are refused (a student draws square noise)."""
    if isinstance(sample_size, int):
        return sample_size
    if len(sample_size) != 2 or sample_size[0] != sample_size[1]:
        raise TeacherError(f"teacher {root!r} makes non-square samples (sample_size {list(sample_size)}); onestep "
                           "distils teachers of square samples (its students draw square noise)")
    return int(sample_size[0])


def _is_sdxl(index: dict, unet_cfg: dict) -> bool:
    return "XL" in index.get("_class_name", "") or "text_encoder_2" in index or bool(unet_cfg.get("addition_embed_type"))


def _check_text_pipeline(root: str, unet_cfg: dict) -> None:
    """A UNet2DConditionModel teacher must come as a whole Stable Diffusion 1.x / 2.x or SDXL pipeline folder."""
    index = _read_index(root)
    added = unet_cfg.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise TeacherError(f"the UNet of {root!r} takes added conditioning {added!r}, which onestep does not support; "
                           "use a Stable Diffusion 1.x / 2.x or SDXL pipeline folder")
    xl = _is_sdxl(index, unet_cfg)
    parts = ("vae", "text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if xl else ())
    missing = [k for k in parts if not os.path.isdir(os.path.join(root, k))]
    if missing:
        kind = ("an SDXL teacher needs a StableDiffusionXLPipeline folder (not a refiner) with unet/, vae/, "
                "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/" if xl else
                "a UNet2DConditionModel teacher needs a Stable Diffusion pipeline folder with unet/, vae/, "
                "text_encoder/, tokenizer/ and scheduler/")
        raise TeacherError(f"{kind}; {root!r} lacks {', '.join(m + '/' for m in missing)}")
    named = [k for k in (*parts, "unet", "scheduler") if not (isinstance(index.get(k), list) and index[k][0])]
    if named:  # the export saves the student as a stock pipeline built from this folder's model_index.json
        what = f"has no {named[0]!r} entry in its model_index.json" if index else "has no model_index.json"
        raise TeacherError(f"teacher: {root!r} {what}; a text-to-image teacher is read as a diffusers pipeline "
                           "folder: re-save it with pipe.save_pretrained(folder)")
    for k in parts:
        if k.startswith(("vae", "text_encoder")):
            _check_weights(os.path.join(root, k), "diffusion_pytorch_model.safetensors" if k == "vae" else
                           "model.safetensors", "re-save the pipeline with save_pretrained(safe_serialization=True)")


def _load_text_part(root: str, index: dict, name: str, default: str, device, dtype):
    """A tokenizer or text encoder of a pipeline folder, by the class model_index.json names (transformers only)."""
    import transformers

    cls_name = (index.get(name) or [None, None])[1] or default
    ok = cls_name.endswith(("Tokenizer", "TokenizerFast")) if name.startswith("tokenizer") else "TextModel" in cls_name
    if not ok or not (hasattr(transformers, cls_name) or hasattr(transformers, cls_name.removesuffix("Fast"))):
        raise TeacherError(f"{name} class {cls_name!r} of {root!r} is not supported; onestep reads CLIP text encoders "
                           "and tokenizers (Stable Diffusion 1.x / 2.x, SDXL)")
    folder = os.path.join(root, name)
    for f in sorted(os.listdir(folder)):  # its configs and vocabularies: a broken one is named
        if f.endswith(".json"):
            _read_json(os.path.join(folder, f))
    if name.startswith("tokenizer"):
        cls = getattr(transformers, cls_name.removesuffix("Fast"), None) or getattr(transformers, cls_name)
        with _loading(name, folder):
            return cls.from_pretrained(folder)
    logs = transformers.utils.logging
    bars, verbosity = logs.is_progress_bar_enabled(), logs.get_verbosity()
    logs.disable_progress_bar()  # keep stderr to errors (a bad input is one line, not a load report above it)
    logs.set_verbosity_error()
    try:
        with _loading(name, folder):
            model = getattr(transformers, cls_name).from_pretrained(folder, use_safetensors=True)
    finally:
        logs.set_verbosity(verbosity)
        if bars:
            logs.enable_progress_bar()
    return model.to(device, dtype).eval().requires_grad_(False)


def _check_tokenizer(tok, enc_cfg, folder: str) -> None:
    """A tokenizer that fits its text encoder: a vocabulary at all (without its files a CLIP tokenizer loads with two
    tokens and maps every word to one), ids inside the encoder's vocabulary, a sequence length the encoder takes."""
    ids = tok("a photo of a cat").input_ids
    words = [i for i in ids if i not in tok.all_special_ids or i == tok.unk_token_id]
    if all(i == tok.unk_token_id for i in words):
        raise TeacherError(f"teacher: tokenizer in {folder} knows no words (each maps to its unknown token; {len(tok)} "
                           "tokens): its vocabulary files (tokenizer.json, or vocab.json and merges.txt) are missing; "
                           "re-save the tokenizer with save_pretrained")
    if max(len(tok), max(ids) + 1) > enc_cfg.vocab_size:
        raise TeacherError(f"teacher: tokenizer in {folder} has {len(tok)} tokens, its text encoder's vocabulary "
                           f"{enc_cfg.vocab_size}; pass the tokenizer saved with that text encoder")
    length, positions = tok.model_max_length, getattr(enc_cfg, "max_position_embeddings", None)
    if not isinstance(length, int) or length < 2 or (positions and length > positions):
        raise TeacherError(f"teacher: tokenizer in {folder} has model_max_length {length}, not a length its text encoder "
                           f"takes (max_position_embeddings {positions}); set \"model_max_length\": {positions or 77} in "
                           f"{os.path.join(folder, 'tokenizer_config.json')}")


def _load_text_teacher(root, unet, schedule, sched_cfg, prompts, frozen_dtype, device, captions=None,
                       negative_prompt: str = "") -> Teacher:
    """The SD / SDXL teacher: UNet in VAE latent space, prompt embeddings cached once, the empty prompt (SDXL: zeros,
    as its pipeline's force_zeros_for_empty_prompt) as null condition, a negative prompt for guidance if given."""
    import diffusers

    from .denoiser import pack_text_time, text_time_pooled_dim, unpack_text_time
    from .prompts import DEFAULT_PROMPTS, PromptTable, encode_prompts, encode_prompts_xl

    index = _read_index(root)
    xl = _is_sdxl(index, dict(unet.config))
    vae_dir = os.path.join(root, "vae")
    vae_cfg = _read_json(os.path.join(vae_dir, "config.json"))
    if frozen_dtype == torch.float16 and vae_cfg.get("force_upcast", True):  # overflows in fp16 (the SDXL VAE)
        vae_dtype = torch.float32
    else:
        vae_dtype = frozen_dtype
    with _loading("vae", vae_dir):
        vae = diffusers.AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, torch_dtype=vae_dtype)
        scale, shift = latent_normalisation(vae.config)  # scaling_factor, latents_mean / latents_std
    extra = [k for k in ("shift_factor",) + (() if xl else ("latents_mean", "latents_std")) if vae.config.get(k)]
    if extra:  # the export decodes as the stock pipeline does: SD by scaling_factor alone, SDXL also by mean / std
        raise TeacherError(f"the VAE of {root!r} has {' and '.join(extra)}, which the stock "
                           f"{'SDXL' if xl else 'Stable Diffusion'} pipeline does not apply when it decodes, so its "
                           "export would decode other latents than the student trained on; use the pipeline's own VAE")
    vae = vae.to(device).eval().requires_grad_(False)
    if vae.config.latent_channels != unet.config.in_channels:
        raise TeacherError(f"the UNet of {root!r} takes {unet.config.in_channels} channels but the VAE makes "
                           f"{vae.config.latent_channels}; onestep distils text-to-image UNets (not inpainting ones)")
    size = square_size(unet.config.sample_size, root)
    shape = (unet.config.in_channels, size, size)  # the latent; images are 2^(len(VAE blocks)-1) times larger
    image_size = size * 2 ** (len(vae.config.block_out_channels) - 1)

    names = ("", "_2") if xl else ("",)
    tokenizers = [_load_text_part(root, index, "tokenizer" + n, "CLIPTokenizer", device, frozen_dtype) for n in names]
    encoders = [_load_text_part(root, index, "text_encoder" + n, "CLIPTextModel", device, frozen_dtype) for n in names]
    for n, tok, enc in zip(names, tokenizers, encoders):
        _check_tokenizer(tok, enc.config, os.path.join(root, "tokenizer" + n))
    if xl:
        pooled_dim = text_time_pooled_dim(dict(unet.config))
        proj = getattr(encoders[1].config, "projection_dim", None)
        if unet.config.addition_embed_type != "text_time" or pooled_dim != proj or not hasattr(encoders[1], "text_projection"):
            raise TeacherError(f"the SDXL UNet of {root!r} expects pooled text embeddings of width {pooled_dim}, but "
                               f"text_encoder_2 ({type(encoders[1]).__name__}) projects to {proj}; pass an unmodified "
                               "SDXL base pipeline (text_encoder_2: CLIPTextModelWithProjection)")
        time_ids = torch.tensor([[image_size, image_size, 0, 0, image_size, image_size]], dtype=torch.float32)

        def encode(texts):  # (N, L + r, D): denoiser.pack_text_time
            return encode_prompts_xl(tokenizers, encoders, texts, time_ids)
    else:
        def encode(texts):  # (N, L, D)
            return encode_prompts(tokenizers[0], encoders[0], texts)

    prompts = list(prompts or captions or DEFAULT_PROMPTS)
    embeds = PromptTable(prompts, encode, modules=encoders)  # cached, or (past ONESTEP_PROMPT_CACHE_MB) encoded as drawn
    caption_embeds = (None if captions is None else embeds if list(captions) == prompts else
                      PromptTable(captions, encode, modules=encoders))
    null = encode([""])                                                   # (1, ...): the empty prompt
    if xl and index.get("force_zeros_for_empty_prompt", True):           # SDXL's unconditional input: zeros
        parts = unpack_text_time(null, pooled_dim)
        null = pack_text_time(torch.zeros_like(parts["encoder_hidden_states"]),
                              torch.zeros_like(parts["added_cond_kwargs"]["text_embeds"]), time_ids)
    negative = encode([negative_prompt]).to(device) if negative_prompt else None
    # a cached table frees the text encoders on return: the export reloads them from the teacher folder

    denoiser = Denoiser(unet, schedule, null_cond=null.to(device))
    return Teacher(denoiser, sched_cfg, root, shape, info={"backbone": "UNet2DConditionModel", "text": True, "sdxl": xl,
                                                            "image_size": image_size},
                   prompts=prompts, prompt_embeds=embeds, vae=vae, latent_scale=scale, latent_shift=shift, negative_cond=negative,
                   caption_embeds=caption_embeds)

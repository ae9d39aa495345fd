"""The run configuration: a typed dataclass filled from defaults <- preset <- YAML file <- CLI overrides.

    accelerate launch train/distill.py --preset digits --steps 500 --real_guidance_scale 2

Any `--key value` names a field below or an option of the chosen method (see `onestep.methods`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field

import yaml

from .errors import OnestepError
from .hostmem import CPU_MALLOC
from .optim import OPTIMIZERS, check_available
from .update import NONFINITE_CHECKS


class ConfigError(OnestepError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


@dataclass
class Config:
    # ---- run ----
    name: str = ""                       # run folder: <output_dir>/<name>; default "<preset>-<method>"
    output_dir: str = "runs"             # parent of run folders
    overwrite: bool = False              # allow reusing a run folder that already holds a run
    resume: str = ""                     # "latest" or a checkpoint folder to continue from
    seed: int = 0                        # global seed (each process offsets it)
    cpu_threads: int = 0                 # CPU runs: torch threads per process (0: this machine's cores / processes;
                                         # accelerate launch alone would pin 1)
    cpu_malloc: str = "reuse"            # CPU runs: "reuse" keeps freed memory in the process (glibc's mmap / trim
                                         # thresholds; no page faults per step: onestep/hostmem.py), "system": glibc's
                                         # defaults
    # ---- teacher and data ----
    teacher: str = "assets/digits-teacher"  # local diffusers folder or hub id
    dataset: str = "digits"              # real images for methods that need them: "digits", "none" or a folder of
                                         # images (+ captions: metadata.jsonl or NAME.txt; onestep.data.read_image_folder)
    prompts: str = ""                    # text-to-image teachers: a text file, one prompt per line ("": the dataset
                                         # folder's captions, else a built-in list)
    negative_prompt: str = ""            # text-to-image teachers: the unconditional branch of the teacher's CFG ("": the
                                         # empty prompt)
    classes: list = field(default_factory=list)  # class labels to distil (empty: all the teacher's classes)
    # ---- method ----
    method: str = "dmd2"                 # a key of onestep.methods.METHODS (train/distill.py --help lists them)
    method_args: dict = field(default_factory=dict)  # options of the method (also accepted as top-level keys)
    # ---- networks ----
    fake_score: str = "auto"             # "copy" (full copy of the teacher), "lora" (adapter on its weights) or
                                         # "auto" (the method's choice: lora for vsd, copy for dmd / dmd2)
    lora_rank: int = 16                  # rank of the LoRA fake score
    lora_targets: list = field(default_factory=list)  # modules the LoRA adapts, e.g. [to_q, to_v] (empty: onestep's default:
                                         # attention projections and resnet convolutions)
    generator_lora_rank: int = 0         # 0: the whole generator trains; N: a LoRA adapter of rank N on the teacher's
                                         # own weights trains instead (shared, not copied), merged into the export
                                         # (on digits it wanted lr_generator 10x the full generator's)
    generator_lora_targets: list = field(default_factory=list)  # modules the generator's LoRA adapts (empty: as
                                         # lora_targets' default)
    generator_timesteps: list = field(default_factory=list)  # few-step student, e.g. [999, 749, 499, 249]; empty: one step
    clip_sample: float = 0.0             # clamp the generator's x0 to [-v, v] in every call, gradient passed straight
                                         # through (diffusers' clip_sample_range; pixel teachers); 0: off
    gan_feature_source: str = "fake_score"  # bottleneck features for the GAN head: "fake_score" or "teacher"
    gan_hidden: int = 0                  # GAN head width (0: the feature width)
    gan_layers: list = field(default_factory=list)  # backbone modules the GAN head reads, e.g. [down_blocks.0.resnets.0, mid_block]
                                         # (empty: the mid-block, as DMD2)
    attention: str = "sdpa"              # "sdpa", "xformers" or "auto"
    gradient_checkpointing: bool = False  # trade compute for memory in the trained networks
    mixed_precision: str = "auto"        # "no", "fp16", "bf16" or "auto" (accelerate launch's --mixed_precision when it
                                         # is not "no", else bf16 on a CUDA device that has it, else fp32)
    tf32: bool = True                    # CUDA: TF32 matmuls and convolutions for what runs in float32
    cudnn_benchmark: bool = False        # CUDA: cuDNN times its convolution algorithms once per shape (H200, CIFAR-size
                                         # DMD step: +3% in TF32, -3% in bf16, i.e. noise; hence off)
    compile: str = ""                    # torch.compile the networks: "" (off), "default", "reduce-overhead" or
                                         # "max-autotune"; the first iteration's time (compilation) is printed
    # ---- multi-student distillation (MSD; onestep/multistudent.py) ----
    students: int = 1                    # K one-step students, each owning a part of the conditions (1: one student)
    router: str = "auto"                 # condition -> student: "balanced" or "confusion" (class labels; confusion groups
                                         # the classes the teacher's samples are confused between), "kmeans" (prompt
                                         # embeddings); "auto": balanced for class labels, kmeans for prompts
    student_channels: list = field(default_factory=list)  # smaller students: the teacher's architecture with these
                                         # block_out_channels, e.g. [32, 32, 32] (empty: the teacher's size and weights)
    student_fake_score: str = "student"  # smaller students' fake score (full copy): "student" (the small architecture,
                                         # from the TSM-trained student) or "teacher" (a copy of the teacher)
    shared_fake_score: bool = False      # one fake score (and GAN head) for all K students, trained jointly as one
                                         # routed generator (each batch split among them); default: one per student
    tsm_steps: int = 1000                # smaller students: Teacher Score Matching iterations before distillation
    tsm_lr: float = 1e-3                 # TSM learning rate (AdamW)
    tsm_pool: int = 1024                 # TSM's clean inputs: this many teacher samples (25-step DDIM) per student
    # ---- optimisation ----
    steps: int = 1200                    # training iterations (each has a critic step; every update_ratio-th a generator step)
    batch_size: int = 64                 # per process
    gradient_accumulation_steps: int = 1 # each update adds up the gradients of this many batches of batch_size (an
                                         # update sees batch_size x this x the processes); activations: one batch's
    lr_generator: float = 5e-5           # the generator's learning rate
    lr_fake: float = 2e-4                # the fake score's (and a GAN head's) learning rate
    optimizer: str = "adamw"             # both optimisers: "adamw" (torch, fused) or "adamw8bit" (bitsandbytes: 8-bit
                                         # moments, 2 instead of 8 bytes per parameter; onestep/optim.py)
    adam_beta1: float = 0.9              # both optimisers (a method may prefer another: sid / sfd 0)
    adam_beta2: float = 0.999
    weight_decay: float = 0.01           # AdamW's decoupled weight decay, both optimisers
    grad_clip: float = 10.0              # max grad norm (0: off)
    max_nonfinite_steps: int = 20        # a non-finite loss or gradient skips that update; this many in a row stop the run
    nonfinite_check: str = "auto"        # where that skip is decided: "host" (a device-to-host read per update),
                                         # "device" (no read: fused AdamW's found_inf; counts read at log / checkpoint
                                         # steps), "auto" (device on an accelerator where possible; onestep/update.py)
    lr_scheduler: str = "constant"       # diffusers get_scheduler name: constant, cosine, linear, constant_with_warmup, ...
    lr_warmup_steps: int = 0             # warm-up in iterations (both optimisers)
    ema_decay: float = 0.0               # generator EMA decay (0: off); exported weights are the EMA where kept. The
                                         # decay at generator step s is diffusers' ramp min((1 + s) / (10 + s), ema_decay)
    offload_ema: bool = False            # keep the EMA in CPU memory and update it there (none on the accelerator)
    # ---- DisBack: degradation recording + distribution backtracking around the method (onestep/disback.py) ----
    backtrack: bool = False              # record the degradation path, start the fake score at its end, walk the DM
                                         # target back node by node to the teacher
    backtrack_nodes: int = 10            # N recorded nodes S'_1..S'_N; the fake score starts from S'_N, the target at S'_{N-1}
    backtrack_interval: int = 100        # iterations on each target node ("plateau": at most)
    backtrack_switch: str = "fixed"      # "fixed" (every backtrack_interval iterations) or "plateau" (also earlier, when
                                         # the smoothed DM-gradient norm stops falling)
    backtrack_patience: int = 30         # plateau: iterations without a new low of the smoothed norm before a switch
    backtrack_tolerance: float = 0.01    # plateau: relative fall of the smoothed norm that counts as a new low
    record_interval: int = 100           # recording: fake-score updates between nodes
    record_lr: float = 0.0               # recording: learning rate (0: lr_fake)
    record_cond_dropout: float = 0.1     # recording: condition dropped to null with this probability
    record_dir: str = ""                 # recording folder ("": <output_dir>/disback/<hash of teacher, generator, settings>;
                                         # reused when it matches, extended when it has fewer nodes)
    # ---- logging, evaluation, checkpoints ----
    log_every: int = 20                  # tensorboard scalars every N iterations
    sample_every: int = 500              # sample grid every N iterations (0: only at the end)
    eval_every: int = 0                  # digits-FID every N iterations (0: only at the end)
    eval_samples: int = 2000             # samples per FID evaluation
    teacher_eval_steps: list = field(default_factory=lambda: [100])  # teacher sampler steps for its FID in metrics.json
    classifier: str = "assets/digits-classifier"  # feature/classifier net for digits-FID ("" to skip FID)
    checkpoint_every: int = 1000         # accelerate save_state every N iterations (0: only at the end)
    checkpoints_total_limit: int = 2     # keep the newest N checkpoints
    export: bool = True                  # write the diffusers pipeline to <run>/pipeline at the end
    preset: str = "digits"               # the preset these values started from


PRESETS: dict[str, dict] = {
    # The embedded default: DMD2 on the shipped digits teacher, under 10 minutes on 2 CPU cores. The student
    # runs at t=300: at t=999 this eps-teacher's alpha is 0.0064, so x0 = (z - sigma eps) / alpha amplifies
    # every weight update 156x and DMD diverges (measured; README "Results").
    # DMD2's GAN weights are scaled for 64x64x3 images: on 8x8 digits the DM term's per-pixel gradient is
    # ~190x larger relative to the GAN's, so the GAN weights are raised and its noise kept low (t < 0.2 T).
    # DM timesteps reach down to t = 1 (t_min 0.001; DMD's 0.02: digits-FID 0.78 vs 0.69 at 600 iterations).
    # The student's x0 is clamped to the data's [-1, 1] with a straight-through gradient (clip_sample 1): the
    # background, which the data holds at exactly -1, may then sit below -1 instead of as grey noise around it
    # (digits-FID 0.431 -> 0.325 at 1200 iterations; generator lr 1e-4 or 2e-4: 0.302 / 0.325 for seed 0, 0.337 /
    # 0.305 for seed 1, a draw). Batch 128 instead of 64: 0.247 / 0.275 for seeds 0 / 1 (0.302 / 0.337), 9 min for
    # the whole default command on 2 cores instead of 6.5.
    "digits": {"generator_timesteps": [300], "ema_decay": 0.99, "lr_generator": 1e-4, "lr_fake": 4e-4, "clip_sample": 1.0,
               "batch_size": 128,
               "method_args": {"update_ratio": 3, "t_min": 0.001, "gan_generator_weight": 0.1,
                               "gan_critic_weight": 1.0, "gan_t_max": 0.2}},
    # SiD (Zhou et al. 2024): 1:1 updates, fake score first, Adam betas (0, 0.999), alpha 1.2. The student runs at
    # t=300 like the digits preset (an eps-teacher at t=999 amplifies updates 156x). Clamp and batch 128 as the
    # digits preset; both lrs on a cosine decay: at a constant lr SiD's FID wanders between evaluations (0.47-0.81
    # at 1000 iterations), the decay settles it. Timesteps t <= 500 instead of SiD's 800 (at t = 800 this teacher's
    # sigma/alpha is 25) and 3000 iterations: digits-FID over 10 000 samples 0.141 / 0.183 / 0.127 / 0.177 / 0.112 for
    # seeds 0-4 (teacher 0.134); t <= 800 at 1500 iterations 0.193 / 0.193 / 0.247, t <= 500 at 1500 0.137 / 0.199 / 0.208.
    "digits-sid": {"method": "sid", "generator_timesteps": [300], "adam_beta1": 0.0, "ema_decay": 0.99,
                   "lr_generator": 2e-4, "lr_fake": 4e-4, "clip_sample": 1.0, "batch_size": 128,
                   "lr_scheduler": "cosine", "steps": 3000, "method_args": {"t_max": 0.5}},
    # DMD (2023): the regression loss on teacher ODE pairs, no GAN. Its distance: the teacher's mid-block features
    # (the paper's LPIPS is a feature distance too): digits-FID 0.721 / 0.734 at seeds 0 / 1 against 0.833 / 1.078
    # with pixel MSE (2000 samples, 1200 iterations).
    "digits-dmd": {"method": "dmd", "generator_timesteps": [300],
                   "method_args": {"regression_weight": 0.25, "regression_distance": "teacher"}},
    # GNDM: the digits preset's DMD2 settings as they were before its batch 128, lr 1e-4 and clamp (eval/gndm_benchmark.py
    # runs DMD2 at these for its comparison), 16 conditions x 4 samples per batch.
    "digits-gndm": {"method": "gndm", "generator_timesteps": [300], "ema_decay": 0.99, "lr_generator": 2e-4,
                    "lr_fake": 4e-4, "method_args": {"update_ratio": 3, "t_min": 0.001, "gan_generator_weight": 0.1,
                                                     "gan_critic_weight": 1.0, "gan_t_max": 0.2, "group_size": 4}},
    # A few iterations at tiny sizes: the smoke test of the whole pipeline.
    "smoke": {"steps": 4, "batch_size": 8, "eval_samples": 100, "teacher_eval_steps": [4], "sample_every": 0,
              "checkpoint_every": 2, "log_every": 1},
    # google/ddpm-cifar10-32 (unconditional, hub or local folder), DMD2 ImageNet-64 settings scaled down.
    "cifar10": {"teacher": "google/ddpm-cifar10-32", "dataset": "none", "steps": 20000, "batch_size": 64,
                "lr_generator": 2e-6, "lr_fake": 2e-6, "classifier": "", "ema_decay": 0.999,
                "method_args": {"gan_generator_weight": 0.0, "gan_critic_weight": 0.0}},
    # Stable Diffusion 1.5 (hub id or local pipeline folder; --prompts FILE). VSD / SwiftBrush: LoRA fake score
    # (rank 64 on to_q, to_v), lr 1e-6 / 1e-3, 1:1, CFG 4.5; batch and steps are choices.
    "sd15-vsd": {"teacher": "stable-diffusion-v1-5/stable-diffusion-v1-5", "method": "vsd", "dataset": "none",
                 "classifier": "", "fake_score": "lora", "lora_rank": 64, "lora_targets": ["to_q", "to_v"],
                 "lr_generator": 1e-6, "lr_fake": 1e-3, "weight_decay": 0.0, "batch_size": 8, "steps": 20000,
                 "method_args": {"real_guidance_scale": 4.5}},
    # DMD2 on SD1.5: TTUR 10, real CFG 1.75, lr 1e-5; the GAN is off unless real images are given
    # (--dataset FOLDER --gan_generator_weight 1e-3 --gan_critic_weight 1e-2, DMD2's SD1.5 weights).
    "sd15-dmd2": {"teacher": "stable-diffusion-v1-5/stable-diffusion-v1-5", "method": "dmd2", "dataset": "none",
                  "classifier": "", "lr_generator": 1e-5, "lr_fake": 1e-5, "batch_size": 8, "steps": 20000,
                  "method_args": {"update_ratio": 10, "real_guidance_scale": 1.75, "gan_generator_weight": 0.0,
                                  "gan_critic_weight": 0.0}},
    # DMD2 on SDXL base (1024 px): its one-step student at t=399, TTUR 5, real CFG 8, lr 5e-7; GAN off unless real
    # images are given (--dataset FOLDER --gan_generator_weight 5e-3 --gan_critic_weight 1e-2, DMD2's SDXL weights).
    "sdxl-dmd2": {"teacher": "stabilityai/stable-diffusion-xl-base-1.0", "method": "dmd2", "dataset": "none",
                  "classifier": "", "generator_timesteps": [399], "lr_generator": 5e-7, "lr_fake": 5e-7,
                  "batch_size": 2, "steps": 20000,
                  "method_args": {"update_ratio": 5, "real_guidance_scale": 8.0, "gan_generator_weight": 0.0,
                                  "gan_critic_weight": 0.0}},
    # VSD on SDXL base: sd15-vsd's SwiftBrush settings carried over unmeasured (a choice), batch 2 at 1024 px.
    "sdxl-vsd": {"teacher": "stabilityai/stable-diffusion-xl-base-1.0", "method": "vsd", "dataset": "none",
                 "classifier": "", "fake_score": "lora", "lora_rank": 64, "lora_targets": ["to_q", "to_v"],
                 "lr_generator": 1e-6, "lr_fake": 1e-3, "weight_decay": 0.0, "batch_size": 2, "steps": 20000,
                 "method_args": {"real_guidance_scale": 4.5}},
}

CHOICES = {"fake_score": ("auto", "copy", "lora"), "attention": ("sdpa", "xformers", "auto"),
           "mixed_precision": ("auto", "no", "fp16", "bf16"), "compile": ("", "default", "reduce-overhead", "max-autotune"),
           "gan_feature_source": ("fake_score", "teacher"),
           "router": ("auto", "balanced", "confusion", "kmeans"), "backtrack_switch": ("fixed", "plateau"),
           "student_fake_score": ("student", "teacher"), "optimizer": OPTIMIZERS,
           "cpu_malloc": CPU_MALLOC, "nonfinite_check": NONFINITE_CHECKS}
POSITIVE = ("steps", "batch_size", "gradient_accumulation_steps", "lr_generator", "lr_fake", "eval_samples", "lora_rank", "max_nonfinite_steps",
            "backtrack_nodes", "backtrack_interval", "backtrack_patience", "record_interval",
            "students", "tsm_lr", "tsm_pool")
NON_NEGATIVE = ("lr_warmup_steps", "cpu_threads", "log_every", "sample_every", "eval_every", "checkpoint_every", "checkpoints_total_limit",
                "grad_clip", "weight_decay", "gan_hidden", "generator_lora_rank", "clip_sample", "backtrack_tolerance", "record_lr", "tsm_steps")


def _convert(key: str, value, typ):
    """Coerce a YAML or CLI value to the field's type, or raise ConfigError naming key and value."""
    origin = typing.get_origin(typ) or typ
    if origin is str and isinstance(value, bool):  # YAML reads unquoted no / off / yes / on as booleans
        raise ConfigError(f"{key}: got the YAML boolean {value} (an unquoted no, off, yes, on, false or true); quote "
                          f"the text, e.g. {key}: 'no'")
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if origin is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
                number = float(value)  # 1e3, as a YAML file reads it
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return int(value)
        if origin is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if origin is list:
            if isinstance(value, str) and value.strip().startswith("["):  # a YAML list: '["a cat, at night", 3]'
                value = yaml.load(value, Loader=_ConfigLoader)
            elif isinstance(value, str):  # a,b,c: numbers become numbers, any other text stays as written
                return [_list_item(v) for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
        if origin is dict:
            value = yaml.load(value, Loader=_ConfigLoader) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        if origin is str:
            if isinstance(value, (list, tuple, dict, bool)):
                raise ValueError
            return "" if value is None else str(value)
    except (ValueError, TypeError, yaml.YAMLError):
        pass
    kind = {bool: "true or false", int: "an integer", float: "a number", list: "a list (a,b,c)",
            dict: "a mapping", str: "a string"}.get(origin, str(typ))
    raise ConfigError(f"{key}: expected {kind}, got {value!r}")


def _list_item(text: str):
    """One item of a command-line list a,b,c: an int or a float if it reads as one, else the text (stripped)."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text) if any(c.isdigit() for c in text) else text  # 1e-3, 0.5; not nan / inf
    except ValueError:
        return text


def _field_types() -> dict:
    return typing.get_type_hints(Config)


def apply(values: dict, cfg: dict, source: str, method: str | None = None) -> None:
    """Merge `values` into the dict `cfg`; keys that are method options go to method_args, as options of the method
    `values` names, else of `method`, else of cfg's."""
    from .methods import METHODS, method_options

    types = _field_types()
    nested = _convert("method_args", values["method_args"], dict) if "method_args" in values else {}
    method = values.get("method") or method or cfg["method"]

    def meaning(key, value):  # as the method reads it (1e-3 and 0.001, '3' and 3 agree)
        try:
            return _method_value(method, key, value)
        except ConfigError:
            return value

    own = method_options(method) if method in METHODS else ()  # other keys: refused below as not the method's
    for key in [k for k in values if k in nested and k in own and k not in types]:
        if meaning(key, values[key]) != meaning(key, nested[key]):
            raise ConfigError(f"{key}: {source} gives it twice, {values[key]!r} as an option and {nested[key]!r} "
                              "under method_args; keep one")
    for key, value in values.items():
        if key == "method_args":
            cfg["method_args"].update(nested)
        elif key in types:
            cfg[key] = _convert(key, value, types[key])
        else:
            if method not in METHODS:
                raise ConfigError(f"method: unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
            if key in method_options(method):
                cfg["method_args"][key] = value
                continue
            owners = [m for m in METHODS if key in method_options(m)]
            if owners:
                raise ConfigError(f"{key}: method {method!r} has no option {key!r} (an option of {', '.join(owners)}); "
                                  f"drop it or pass --method {owners[0]}")
            close = difflib.get_close_matches(key, [*types, *{k for m in METHODS for k in method_options(m)}], 1)
            raise ConfigError(f"unknown config key {key!r} in {source}" + (f" (did you mean {close[0]}?)" if close else "")
                              + "; see `accelerate launch train/distill.py --help` for the keys")


def parse_cli(argv: list[str]) -> tuple[dict, str | None, str | None]:
    """Split argv into overrides, a --config file and a --preset name."""
    out, config_file, preset, i = {}, None, None, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; options look like --key value")
        key, _, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not _:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("--"):
                if key in ("config", "preset"):
                    raise ConfigError(f"{key}: needs a value: --{key} {'FILE.yaml' if key == 'config' else 'NAME'}")
                val = "true"  # a bare flag
            else:
                val, i = nxt, i + 1
        if key in ("config", "preset") and (config_file if key == "config" else preset) not in (None, val):
            raise ConfigError(f"{key}: given twice ({config_file if key == 'config' else preset!r}, {val!r}); pass one "
                              f"{'file (a file may set preset:)' if key == 'config' else 'preset'}")
        if key == "config":
            config_file = val
        elif key == "preset":
            preset = val
        else:
            out[key] = val
        i += 1
    return out, config_file, preset


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads 1e-3 as a number, as YAML 1.2 does (PyYAML's YAML 1.1 wants 1.0e-3)."""


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d[\d_]*)?\.?\d*[eE][-+]?\d+$"),
                                    list("-+.0123456789"))


class _UniqueKeyLoader(_ConfigLoader):
    """The config files' loader: refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"config file: key {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                                  "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(argv: list[str]) -> Config:
    """defaults <- preset <- YAML file <- CLI overrides, then validated."""
    overrides, config_file, preset = parse_cli(argv)
    file_values = {}
    if config_file == "" or preset == "":
        raise ConfigError(f"{'config' if config_file == '' else 'preset'}: empty; pass a "
                          f"{'YAML file' if config_file == '' else 'preset name: ' + ', '.join(PRESETS)} or drop the option")
    if config_file:
        try:
            with open(config_file, encoding="utf-8") as f:
                file_values = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {config_file!r} does not exist") from None
        except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
            raise ConfigError(f"config file {config_file!r} cannot be read as text ({type(e).__name__}); pass a YAML "
                              "file of key: value lines") from None
        except yaml.YAMLError as e:  # the parser's problem and where it is, on one line
            problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"config file {config_file!r} is not valid YAML: {problem or str(e).splitlines()[0]}"
                              f"{where}") from None
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file {config_file!r} must hold a mapping of keys to values")
    file_preset = file_values.pop("preset", None)
    if preset and file_preset is not None and file_preset != preset:
        raise ConfigError(f"preset: the config file names preset {file_preset!r} and the command line {preset!r}; the "
                          "file's values override a preset's, so pass one of them (or edit the file's preset)")
    preset = preset or file_preset or "digits"
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = dataclasses.asdict(Config())
    cfg["preset"] = preset
    apply(PRESETS[preset], cfg, f"preset {preset!r}")
    before_file = copy.deepcopy(cfg)
    preset_method, preset_args, cfg["method_args"] = cfg["method"], cfg["method_args"], {}
    # a file's method options belong to the method it names, else to the command line's, else to the preset's
    file_method = file_values.get("method") or overrides.get("method") or preset_method
    apply(file_values, cfg, f"config file {config_file!r}", method=file_method)
    file_margs, cfg["method_args"] = cfg["method_args"], {}
    apply(overrides, cfg, "the command line")
    from .methods import METHODS, method_options

    cli_margs, cfg["method_args"], dropped, sources = cfg["method_args"], {}, {}, []
    for source, owner, margs in ((f"preset {preset!r}", preset_method, preset_args),
                                 (f"config file {config_file!r}", file_method, file_margs)):
        if owner == cfg["method"]:  # a preset's or file's method options belong to its method
            cfg["method_args"].update(margs)
            continue
        new = {k: v for k, v in margs.items()  # another method starts clean: the options it has too are named
               if cfg["method"] in METHODS and k in method_options(cfg["method"]) and k not in cli_margs}
        dropped.update(new)
        sources += [f"{source} for {owner}"] if new else []
    cfg["method_args"].update(cli_margs)
    notes = [f"note: method {cfg['method']} starts from its own option defaults, not from "
             f"{', '.join(f'{k} {v}' for k, v in dropped.items())} ({' and '.join(sources)}); pass them to keep "
             "them"] if dropped else []

    for key, value in getattr(METHODS.get(cfg["method"]), "preferred_config", {}).items():  # e.g. SiD's Adam betas
        if key not in PRESETS[preset] and key not in file_values and key not in overrides:
            cfg[key] = value
    config = Config(**cfg)
    from .cli import asset_path

    config.teacher, config.classifier = asset_path(config.teacher), asset_path(config.classifier)  # from any folder
    method = validate(config)
    config.method_args = method_kwargs(config)  # typed, so config.yaml records 1.5, not '1.5'
    if config.fake_score == "auto":  # resolved here, so config.yaml records what ran
        config.fake_score = getattr(METHODS[config.method], "preferred_fake_score", "copy")
    # a run's own config.yaml lists every key: a file's keys count as given where they change the preset's value
    changed = {k for k in file_values if k in before_file and getattr(config, k) != before_file[k]}
    file_args = {**{k: v for k, v in file_values.items() if k not in before_file},
                 **(file_values.get("method_args") or {})} if file_method == config.method else {}
    preset_typed = method_kwargs(dataclasses.replace(config, method_args=preset_args)) if (
        config.method == preset_method) else {}
    changed |= {k for k in file_args if k not in preset_typed or config.method_args.get(k) != preset_typed[k]}
    check_unused(config, set(overrides) | changed, method, {k: f"config file {config_file!r}" for k in changed - set(overrides)})
    config._notes = notes  # said once the run starts (print_notes)
    return config


def print_notes(cfg: Config) -> None:
    """What load_config noticed but let through, as `note:` lines on stderr; a script prints them once its run has
    started, so that bad input found later still ends in one line."""
    for note in getattr(cfg, "_notes", []):
        print(note, file=sys.stderr)


def saved_config(cfg: Config) -> dict:
    """config.yaml: the resolved configuration, as a new run's (no resume / overwrite), so that `--config` with it
    starts a run of the same settings rather than reopening this one."""
    return {**dataclasses.asdict(cfg), "resume": "", "overwrite": False}


# a method's options that its other settings leave unused: (options, whether they are used, what they need)
METHOD_OPTION_NEEDS = (
    (("regression_pairs", "regression_steps", "regression_batch", "regression_distance", "regression_feature_t"),
     lambda m: m.regression_weight > 0, "--regression_weight > 0"),
    (("gan_t_max", "gan_start"), lambda m: m.uses_gan, "a GAN (--gan_generator_weight > 0)"),
    (("kappa_min", "kappa_max", "kappa_draw", "kappa_shared"), lambda m: m.random_guidance, "--random_guidance true"),
    (("warmup_t_min", "warmup_t_max"), lambda m: m.forget_warmup > 0, "--forget_warmup > 0"),
    (("advantage", "advantage_scale", "advantage_eps", "normaliser", "shared_t"), lambda m: m.group_size > 1,
     "--group_size > 1 (a group of one has no advantage and is its own normaliser)"),
    (("reward_weights", "reward_gradient_weight", "reward_decay", "reward_eps"), lambda m: bool(m.rewards), "--rewards"),
    (("clip_model", "clip_prompt"), lambda m: "clip" in m.rewards, "--rewards clip"),
    (("clip_range",), lambda m: m.reuse > 1 or m.pg_weight > 0, "--reuse > 1 or --pg_weight > 0"),
    (("p_mean", "p_std"), lambda m: m.fake_t in ("auto", "lognormal"),
     "--fake_t lognormal (or auto on an EDM teacher)"),
)


def check_unused(cfg: Config, given: set, method, sources: dict | None = None) -> None:
    """Options the user gave (command line, or a config file's changes to the preset) that this run would ignore:
    refused (naming where a key came from, `sources`, where it is not the command line)."""
    guided = getattr(method, "uses_guidance", getattr(method, "real_guidance_scale", 1.0) != 1.0)
    needs = [(("lora_rank", "lora_targets"), cfg.fake_score == "lora", "--fake_score lora"),
             (("generator_lora_targets",), cfg.generator_lora_rank > 0, "--generator_lora_rank N"),
             (("gan_hidden", "gan_layers", "gan_feature_source"), getattr(method, "uses_gan", False),
              "a GAN (method dmd2 or gndm, a GAN weight > 0)"),
             (("router",), cfg.students > 1, "--students K > 1"),
             (("tsm_steps", "tsm_lr", "tsm_pool", "student_fake_score"), bool(cfg.student_channels), "--student_channels"),
             (tuple(f.name for f in dataclasses.fields(Config) if f.name.startswith(("backtrack_", "record_"))),
              cfg.backtrack, "--backtrack"),
             (("backtrack_patience", "backtrack_tolerance"), cfg.backtrack_switch == "plateau", "--backtrack_switch plateau"),
             (("negative_prompt",), guided, "guidance (--real_guidance_scale other than 1, or --random_guidance true)")]
    needs += [(keys, all(hasattr(method, k) for k in keys) and used(method), gate)
              for keys, used, gate in METHOD_OPTION_NEEDS]
    for keys, used, gate in needs:
        unused = [k for k in keys if k in given and not used]
        if unused:
            where = f" (from {sources[unused[0]]})" if unused[0] in (sources or {}) else ""
            raise ConfigError(f"{unused[0]}: only used with {gate}, which this run does not have; drop it{where} or add "
                              "that")


def validate(cfg: Config):
    """Check ranges and choices; raise ConfigError with the key, the value and what is allowed. Returns the method."""
    from .attention import resolve_attention
    from .methods import build_method

    from .prompts import PromptError, cache_bytes

    try:
        resolve_attention(cfg.attention)
        cache_bytes()  # $ONESTEP_PROMPT_CACHE_MB, before any teacher loads or folder is made
    except PromptError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(f"attention: {e}") from None
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {getattr(cfg, key)!r} is not one of {', '.join(a or repr(a) for a in allowed)}")
    if cfg.dataset not in ("digits", "none") and not os.path.isdir(cfg.dataset):
        raise ConfigError(f"dataset: {cfg.dataset!r} is not 'digits', 'none' or an existing folder of images")
    for key in POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {getattr(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {getattr(cfg, key)!r}")
    schedulers = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
    if cfg.lr_scheduler not in schedulers:
        raise ConfigError(f"lr_scheduler: {cfg.lr_scheduler!r} is not one of {', '.join(schedulers)}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay: must be in [0, 1), got {cfg.ema_decay!r}")
    if cfg.offload_ema and not cfg.ema_decay:
        raise ConfigError("offload_ema: this run keeps no EMA (ema_decay 0); set --ema_decay or drop --offload_ema")
    try:
        check_available(cfg.optimizer)
    except OnestepError as e:
        raise ConfigError(str(e)) from None
    if cfg.nonfinite_check == "device" and (cfg.optimizer != "adamw" or cfg.mixed_precision == "fp16"):
        why = f"optimizer {cfg.optimizer!r}" if cfg.optimizer != "adamw" else "mixed_precision fp16 (a gradient scaler)"
        raise ConfigError(f"nonfinite_check: 'device' needs torch's fused AdamW without a gradient scaler, not {why}; "
                          "use --nonfinite_check auto or host")
    if not (0.0 <= cfg.adam_beta1 < 1.0 and 0.0 <= cfg.adam_beta2 < 1.0):
        raise ConfigError(f"adam_beta1/adam_beta2: must be in [0, 1), got {cfg.adam_beta1}, {cfg.adam_beta2}")
    for key in ("classes", "generator_timesteps", "teacher_eval_steps", "student_channels"):
        for v in getattr(cfg, key):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (key != "generator_timesteps" and not isinstance(v, int)):
                raise ConfigError(f"{key}: expected {'numbers' if key == 'generator_timesteps' else 'integers'}, got {v!r}")
    for key in ("lora_targets", "generator_lora_targets"):
        if not all(isinstance(v, str) and v for v in getattr(cfg, key)):
            raise ConfigError(f"{key}: expected module names like to_q,to_v, got {getattr(cfg, key)!r}")
    if not all(isinstance(v, str) and v for v in cfg.gan_layers):
        raise ConfigError(f"gan_layers: expected backbone module names like down_blocks.0.resnets.0,mid_block, got {cfg.gan_layers!r}")
    if any(c < 1 for c in cfg.student_channels):
        raise ConfigError(f"student_channels: channel counts must be >= 1, got {cfg.student_channels}")
    if any(s < 1 for s in cfg.teacher_eval_steps):
        raise ConfigError(f"teacher_eval_steps: sampler step counts must be >= 1, got {cfg.teacher_eval_steps}")
    if not cfg.output_dir:
        raise ConfigError("output_dir: empty; pass the folder that holds run folders (default runs)")
    if cfg.eval_every and not cfg.classifier:
        raise ConfigError("eval_every: FID during training needs the digits classifier; pass --classifier "
                          "assets/digits-classifier or --eval_every 0")
    if cfg.eval_samples < 2:
        raise ConfigError(f"eval_samples: FID needs at least 2 samples, got {cfg.eval_samples}")
    for key, cap in (("lora_rank", 4096), ("generator_lora_rank", 4096), ("gan_hidden", 65536)):
        if getattr(cfg, key) > cap:
            raise ConfigError(f"{key}: at most {cap}, got {getattr(cfg, key)} (a network that size does not fit in memory)")
    if cfg.method == "sfd" and cfg.students > 1:
        raise ConfigError("method: sfd forgets classes or prompts of the whole condition set, which --students K > 1 "
                          "splits among the students; train SFD with --students 1")
    if cfg.generator_lora_rank and (cfg.students > 1 or cfg.student_channels):
        raise ConfigError("generator_lora_rank: a LoRA generator trains on the teacher's own weights, one student of its "
                          "architecture; drop it, or --students / --student_channels")
    if cfg.shared_fake_score and cfg.students < 2:
        raise ConfigError("shared_fake_score: shares one fake score among --students K > 1; drop it for one student")
    if cfg.backtrack and not 0.0 <= cfg.record_cond_dropout <= 1.0:
        raise ConfigError(f"record_cond_dropout: must be in [0, 1], got {cfg.record_cond_dropout!r}")
    if cfg.backtrack and (cfg.backtrack_nodes - 1) * cfg.backtrack_interval >= cfg.steps:
        raise ConfigError(f"backtrack_interval: {cfg.backtrack_nodes - 1} target nodes x {cfg.backtrack_interval} iterations "
                          f"do not end on the teacher within --steps {cfg.steps}; lower backtrack_interval or backtrack_nodes")
    if cfg.overwrite and cfg.resume:
        raise ConfigError("overwrite: --overwrite replaces a run and --resume continues it; pass one of them")
    if cfg.classifier and not os.path.isdir(cfg.classifier):
        raise ConfigError(f"classifier: {cfg.classifier!r} is not a folder; pass the digits classifier "
                          "(assets/digits-classifier) or --classifier '' for no digits-FID")
    if cfg.backtrack and cfg.record_dir and os.path.exists(cfg.record_dir) and not os.path.isdir(cfg.record_dir):
        raise ConfigError(f"record_dir: {cfg.record_dir!r} is a file; pass a folder for the DisBack recording")
    if cfg.backtrack and cfg.record_dir:
        from .disback import check_not_foreign

        try:
            check_not_foreign(cfg.record_dir)
        except OnestepError as e:
            raise ConfigError(str(e)) from None
    if cfg.backtrack and cfg.gan_feature_source == "teacher":
        raise ConfigError("gan_feature_source: 'teacher' would give the GAN head the moving backtracking target's features "
                          "under --backtrack; use fake_score")
    if cfg.name and ("/" in cfg.name or cfg.name.startswith(".")):
        raise ConfigError(f"name: {cfg.name!r} must be a plain folder name (no '/', not starting with '.')")
    try:
        method = build_method(cfg.method, **method_kwargs(cfg))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e) if re.match(r"\w+: ", str(e)) else f"method: {e}") from None  # "key: ..." as it is
    _check_numbers(cfg, method)
    if getattr(method, "group_size", 1) > 1 and cfg.batch_size % method.group_size:
        raise ConfigError(f"group_size: {method.group_size} does not divide --batch_size {cfg.batch_size} (the samples per "
                          "process); pick a divisor")
    if getattr(method, "shared_critic_pass", False) and cfg.gradient_accumulation_steps > 1:
        raise ConfigError("shared_critic_pass: the critic's backward would run on forwards of the generator turn, each "
                          "micro-batch's graph kept (and, under DDP, synchronised as the forward was): use false with "
                          f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}")
    if getattr(method, "reuse", 1) > 1 and cfg.gradient_accumulation_steps > 1:
        raise ConfigError(f"reuse: a rollout serves {method.reuse} updates, but with --gradient_accumulation_steps "
                          f"{cfg.gradient_accumulation_steps} the micro-batches of one update would share it; use one of "
                          "them")
    return method


def check_teacher_fit(cfg: Config, teacher) -> None:
    """The options that depend on the loaded teacher: its time range, its sample space, its sampler's step count."""
    from .cli import asset_path

    schedule, from_preset = teacher.denoiser.schedule, PRESETS[cfg.preset].get("generator_timesteps")
    if teacher.text_conditional and schedule.kind != "vp":  # the export is a stock SD / SDXL pipeline (LCMScheduler)
        raise ConfigError(f"teacher: this text-to-image teacher's schedule is {schedule.kind.upper()}, not VP (as "
                          "Playground v2.5's is EDM), and its student would have no stock one-step SD / SDXL export; "
                          "use a Stable Diffusion 1.x / 2.x or SDXL teacher with a DDPM-family scheduler")
    units = {"vp": f"whole timesteps 0..{schedule.t_max}",
             "edm": f"noise levels sigma in [{schedule.sigma_min}, {schedule.t_max}]",
             "flow": "flow times t in (0, 1]"}[schedule.kind]
    given = (f" (the {cfg.preset} preset's value)" if cfg.generator_timesteps == from_preset else "") + \
        f"; this teacher's times are {units}: pass --generator_timesteps in that range (or '[]': one step from the " \
        "top, SiD's sigma_init on EDM teachers)"
    if any(t > schedule.t_max for t in cfg.generator_timesteps):
        raise ConfigError(f"generator_timesteps: {cfg.generator_timesteps} exceed this teacher's largest time "
                          f"{schedule.t_max}{given}")
    low = {"vp": (0, "0"), "edm": (schedule.sigma_min, f"its sigma_min {schedule.sigma_min}"), "flow": (0, "0 (exclusive)")}
    lo, what = low[schedule.kind]
    if any(t < lo or (schedule.kind == "flow" and t == 0) for t in cfg.generator_timesteps):
        raise ConfigError(f"generator_timesteps: {cfg.generator_timesteps} go below this teacher's smallest time, "
                          f"{what}{given}")
    if schedule.kind == "vp" and any(float(t) != int(t) for t in cfg.generator_timesteps):
        raise ConfigError(f"generator_timesteps: {cfg.generator_timesteps} are not whole numbers{given}")
    if cfg.clip_sample and teacher.text_conditional:
        raise ConfigError("clip_sample: latents have no fixed range to clamp to; use --clip_sample 0 with this teacher")
    if teacher.sample_shape != (1, 8, 8):  # digits-FID measures 8x8 digits; other teachers: eval/benchmark.py
        shape = "x".join(map(str, teacher.sample_shape))
        default = ("", Config.classifier, asset_path(Config.classifier))  # the default, resolved from any folder too
        for key, given in (("eval_every", cfg.eval_every > 0), ("classifier", cfg.classifier not in default)):
            if given:
                raise ConfigError(f"{key}: the digits classifier measures 1x8x8 digits and this teacher makes {shape}; "
                                  f"drop --{key} and measure the exported pipeline with eval/benchmark.py")
    steps = {"teacher_eval_steps": max(cfg.teacher_eval_steps, default=1),
             "regression_steps": cfg.method_args.get("regression_steps", 1)}
    for key, n in steps.items():
        if n > schedule.num_train_timesteps:
            raise ConfigError(f"{key}: {n} sampler steps; this teacher's schedule has {schedule.num_train_timesteps} "
                              "timesteps, the most a DDIM sampler can take")
    preset_steps = PRESETS[cfg.preset].get("teacher_eval_steps", Config().teacher_eval_steps)
    if (not cfg.classifier or teacher.sample_shape != (1, 8, 8)) and cfg.teacher_eval_steps not in ([], preset_steps):
        raise ConfigError("teacher_eval_steps: the teacher's FID is a digits-FID, which this run does not have (1x8x8 "
                          "teacher and --classifier); drop it, or measure the teacher with eval/benchmark.py --teacher "
                          "T --steps N")
    if "sigma_init" in cfg.method_args:  # SiD / SFD: the generator's sigma on EDM teachers, where no times are given
        sigma = cfg.method_args["sigma_init"]
        if schedule.kind != "edm":
            raise ConfigError(f"sigma_init: {sigma} is not used: this teacher is not an EDM one (sigma_init is an EDM "
                              "generator's starting sigma; --generator_timesteps sets where others start); drop it")
        if cfg.generator_timesteps:
            raise ConfigError(f"sigma_init: {sigma} is not used: --generator_timesteps sets the generator's times; "
                              "drop one")
        if sigma > schedule.sigma_max:
            raise ConfigError(f"sigma_init: {sigma} exceeds this teacher's sigma_max {schedule.sigma_max}; pass at most "
                              "that")
    lognormal = [k for k in ("p_mean", "p_std") if k in cfg.method_args]  # SiD's fake-loss times, log-normal in sigma
    if lognormal and schedule.kind != "edm" and cfg.method_args.get("fake_t", "auto") == "auto":
        raise ConfigError(f"{lognormal[0]}: not used: on this {schedule.kind.upper()} teacher fake_t auto draws the fake "
                          "loss's times as the generator's; add --fake_t lognormal or drop it")


def _check_numbers(cfg: Config, method) -> None:
    """Finite numbers everywhere (method options too) and the ranges the checks above leave open: method options
    named *t_min / *t_max are fractions of the schedule's range in [0, 1] (min <= max); *_weight / *_coef are >= 0."""
    fields = dataclasses.fields(method) if dataclasses.is_dataclass(method) else ()
    options = {f.name: getattr(method, f.name) for f in fields}
    for key, value in {**dataclasses.asdict(cfg), **options}.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                what = "finite numbers" if isinstance(value, list) else "a finite number"
                raise ConfigError(f"{key}: must be {what}, got {value!r}")
    if cfg.steps > 10**7:
        raise ConfigError(f"steps: must be at most 1e7 iterations (10 million), got {cfg.steps!r}")
    if cfg.log_every < 1:
        raise ConfigError(f"log_every: must be > 0, got {cfg.log_every!r}")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed: must be in 0..{2**32 - 1}, got {cfg.seed!r}")
    if any(t < 0 for t in cfg.generator_timesteps):
        raise ConfigError(f"generator_timesteps: must be >= 0, got {cfg.generator_timesteps}")
    if any(a <= b for a, b in zip(cfg.generator_timesteps, cfg.generator_timesteps[1:])):
        raise ConfigError(f"generator_timesteps: a few-step student goes from noise to data, so the times must fall "
                          f"strictly (e.g. 999,749,499,249), got {cfg.generator_timesteps}")
    if cfg.lr_warmup_steps > cfg.steps:
        raise ConfigError(f"lr_warmup_steps: {cfg.lr_warmup_steps} is longer than the run (--steps {cfg.steps}), so the "
                          "learning rate would never reach its value; use at most --steps")
    if cfg.lr_warmup_steps and cfg.lr_scheduler == "constant":  # diffusers' constant schedule has no warm-up
        raise ConfigError(f"lr_warmup_steps: the constant schedule takes no warm-up; pass --lr_scheduler "
                          "constant_with_warmup (or cosine, linear, ...) or drop --lr_warmup_steps")
    if len(cfg.generator_timesteps) > 1 and options.get("regression_weight", 0) > 0:
        raise ConfigError(f"regression_weight: DMD1's regression pairs one-step outputs with the teacher's ODE from the "
                          f"same noise; a {len(cfg.generator_timesteps)}-step student re-noises: use one timestep or 0")
    from .schedule import PREDICTION_TYPES

    if options.get("fake_loss_space", "auto") not in ("auto", *PREDICTION_TYPES):
        raise ConfigError(f"fake_loss_space: {options['fake_loss_space']!r} is not one of auto, {', '.join(PREDICTION_TYPES)}")
    for key, v in options.items():
        if key in ("regression_pairs", "regression_steps", "regression_batch") and v < 1:
            raise ConfigError(f"{key}: must be >= 1, got {v!r}")
        if (key == "norm_eps" and v <= 0) or (key.endswith("guidance_scale") and v < 0):
            raise ConfigError(f"{key}: must be {'> 0' if key == 'norm_eps' else '>= 0'}, got {v!r}")
        if isinstance(v, float) and key.endswith(("t_min", "t_max")) and not 0.0 <= v <= 1.0:
            raise ConfigError(f"{key}: a fraction of the teacher's time range, must be in [0, 1], got {v!r}")
        if isinstance(v, float) and key.endswith(("_weight", "_coef")) and v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v!r}")
        if key.endswith("t_min") and isinstance(options.get(key[:-3] + "max"), float) and v > options[key[:-3] + "max"]:
            raise ConfigError(f"{key}: must be <= {key[:-3]}max ({options[key[:-3] + 'max']!r}), got {v!r}")


def _method_value(method: str, key: str, value):
    from .methods import METHODS, method_options

    if key not in method_options(method):
        return value  # build_method reports it
    return _convert(key, value, typing.get_type_hints(METHODS[method])[key])


def method_kwargs(cfg: Config) -> dict:
    """The method's options with their declared types."""
    return {k: _method_value(cfg.method, k, v) for k, v in cfg.method_args.items()}

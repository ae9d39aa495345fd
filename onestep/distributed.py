"""FSDP2 through accelerate for the triad: which runs it serves, how the trained networks are wrapped, and the few
places where sharded parameters need care (gathering, requires_grad toggles, gradient clipping).

accelerate's FSDP2 takes one module and its optimiser per `prepare`: the generator, the fake score (a full copy; or,
for a LoRA fake score, the backbone it shares with the teacher, so every call of either view gathers it) and the GAN
head, which therefore has its own optimiser. `fully_shard` works in place: the triad keeps its modules.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
from torch import nn


@functools.lru_cache(maxsize=None)
def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:  # torch < 2.6
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:  # a torch build without distributed support
            return None
    return FSDPModule


def is_sharded(module) -> bool:
    """Whether FSDP2's fully_shard wraps this module (its parameters are DTensor shards)."""
    cls = _fsdp_module_class()
    return cls is not None and isinstance(module, cls)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every process calls it); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reshard(module: nn.Module) -> None:
    """FSDP2 gives its gathered parameters the shards' requires_grad only when it gathers them: after a toggle, drop
    the gathered copies (a unit left gathered by a no-grad forward would keep the old flag in the next turn and train
    nothing); the next forward or backward gathers again."""
    for m in module.modules():  # the role's module, or (LoRA fake score) the shared backbone inside it
        if is_sharded(m):
            m.reshard()


def init_sharded(module: nn.Module) -> None:
    """Settle an FSDP2 root now, while its trainable parameters say so: FSDP2 fixes each unit's dtypes (which gradients
    it casts back to the float32 master dtype) from requires_grad at the root's first forward, and a first forward
    inside `Triad.frozen` (VSD's, with a LoRA fake score) would leave its gradients in bf16."""
    state = getattr(module, "_get_fsdp_state", None)
    if state is not None and hasattr(state(), "_lazy_init"):
        state()._lazy_init()


FSDP2_TORCH = (2, 6)  # accelerate's FSDP2 needs torch >= 2.6


def mixed_precision(cfg) -> str:
    """--mixed_precision, where 'auto' is the launcher's choice, else bf16 autocast on a GPU that has it."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    return mp if mp != "no" else ("bf16" if gpu and torch.cuda.is_bf16_supported() else "no")


def check_launch(torch_version: str = torch.__version__) -> None:
    """Before the Accelerator is built: an FSDP2 launch on a torch too old for it, refused in one line (accelerate
    raises it as an ImportError from inside its constructor)."""
    from packaging.version import Version

    from .config import ConfigError

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true" or os.environ.get("FSDP_VERSION", "1") != "2":
        return
    if Version(torch_version).release[:2] < FSDP2_TORCH:
        raise ConfigError(f"accelerate config: FSDP2 needs torch >= {'.'.join(map(str, FSDP2_TORCH))} (this is "
                          f"{torch_version}); upgrade torch or launch with DDP (train/accelerate/ddp.yaml)")


def check_joined(state) -> None:
    """Processes a launcher started (WORLD_SIZE) that accelerate did not join into one run (`state`: an Accelerator
    or PartialState), refused in one line: without GPUs `accelerate launch --multi_gpu` needs ACCELERATE_USE_CPU=1,
    else each process would run alone, into the same folder."""
    from .config import ConfigError

    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world > state.num_processes:
        raise ConfigError(f"accelerate launched {world} processes but they did not join into one run (each sees "
                          f"{state.num_processes}); on a machine without GPUs launch with ACCELERATE_USE_CPU=1 "
                          f"accelerate launch --multi_gpu --num_processes {world} ..., or run one process")


def distributed_mode(accelerator, cfg, gan: bool = False) -> bool:
    """Whether this run is sharded (FSDP2); refuses in one line what the trainer cannot serve (and processes that
    were not joined: check_joined), and says so where accelerate runs an FSDP config unsharded (on CPUs)."""
    from .config import ConfigError

    check_joined(accelerator)
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED":
        raise ConfigError("accelerate config: DeepSpeed is not supported by this trainer; use FSDP "
                          "(train/accelerate/fsdp.yaml) or DDP (train/accelerate/ddp.yaml)")
    if kind != "FSDP":
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.is_main_process:
            print("warning: accelerate runs an FSDP config on CPUs as plain data parallelism; the weights are "
                  "replicated", file=sys.stderr)
        return False
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ConfigError("accelerate config: FSDP version 1 is not supported; set fsdp_version: 2 "
                          "(train/accelerate/fsdp.yaml)")
    refused = [(cfg.backtrack, "--backtrack (DisBack; use DDP)"),
               (cfg.offload_ema, "--offload_ema (under FSDP the EMA is sharded like the generator; drop the flag)"),
               (cfg.compile, "--compile (use DDP to compile)"),
               (cfg.generator_lora_rank, "--generator_lora_rank (its weights are the teacher's, shared; use DDP)"),
               (gan and accelerator.mixed_precision == "fp16", "mixed_precision fp16 with a GAN head (its optimiser and "
                "the fake score's share one gradient scaler per turn; use bf16)")]
    for bad, what in refused:
        if bad:
            raise ConfigError(f"accelerate config: FSDP does not support {what}")
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    if getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy) is size_based_auto_wrap_policy:
        raise ConfigError("accelerate config: fsdp_auto_wrap_policy SIZE_BASED_WRAP picks UNet containers that FSDP2 "
                          "cannot wrap; use TRANSFORMER_BASED_WRAP (train/accelerate/fsdp.yaml)")
    # checkpoints as full state dicts (gathered to the main process; tensors only, loaded with weights_only)
    plugin.state_dict_config = plugin.optim_state_dict_config = None  # rebuilt for the full type
    plugin.set_state_dict_type("FULL_STATE_DICT")
    return True


def _prepare_one(accelerator, module: nn.Module, optimizer):
    """accelerate's FSDP2 prepare of one trained module and its optimiser. With TRANSFORMER_BASED_WRAP, each block of
    the listed classes (fsdp_transformer_layer_cls_to_wrap; by default the UNet's ResnetBlock2D and Transformer2DModel,
    or its Attention blocks where it has no transformer) is its own FSDP unit, the module the root; names this module
    lacks are skipped (the GAN head has none)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy) is transformer_auto_wrap_policy:
        if not hasattr(plugin, "_onestep_units"):  # the user's list, or None, kept across modules
            plugin._onestep_units = plugin.transformer_cls_names_to_wrap
        present = {type(m).__name__ for m in module.modules()}
        names = plugin._onestep_units or ["ResnetBlock2D", "Transformer2DModel" if "Transformer2DModel" in present
                                          else "Attention"]
        plugin.transformer_cls_names_to_wrap = [n for n in names if n in present]
    return accelerator.prepare(module, optimizer)


def prepare_sharded(accelerator, triad, lora: bool, optimizers: tuple, schedulers: tuple) -> tuple:
    """Wrap the triad's trained networks with FSDP2 (in place) and prepare their optimisers (generator, fake score,
    GAN head or None) and schedulers; returns both, prepared. Also keeps the generator's architecture for unsharded
    exports (main process), settles each root and rebuilds the EMA on the shards."""
    opt_g, opt_f, opt_h = optimizers
    if accelerator.is_main_process:
        triad.keep_template()  # to rebuild the unsharded generator from gathered weights (export, samples, FID)
    fake = triad.fake_score.backbone if lora else triad.fake_score  # a LoRA's backbone: the teacher view shares it
    roots = [triad.generator, fake] + ([triad.gan_head] if opt_h is not None else [])
    opts = [_prepare_one(accelerator, m, o)[1] for m, o in zip(roots, (opt_g, opt_f, opt_h))]
    scheds = [None if s is None else accelerator.prepare(s) for s in schedulers]
    for module in roots:
        init_sharded(module)
    triad.reset_ema()  # on the shards
    return tuple(opts + [None] * (3 - len(opts))), tuple(scheds)


def clip_grad_norm(accelerator, params: list, max_norm: float) -> torch.Tensor:
    """accelerate's clip_grad_norm_; under FSDP torch's on the DTensor gradients (of one mesh) after unscaling:
    accelerate's FSDP branch compares parameter lists with ==, which fails for two prepared modules of one size."""
    if accelerator.distributed_type.value != "FSDP":
        return accelerator.clip_grad_norm_(params, max_norm)
    accelerator.unscale_gradients()
    return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))

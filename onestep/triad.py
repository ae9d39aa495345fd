"""The triad: generator (trained), fake score (trained), teacher (frozen), and an optional GAN head.

Built from a teacher denoiser. The fake score is a full copy of the teacher or a peft LoRA adapter
on the teacher's own weights (then the teacher is the same module with adapters disabled: one copy
of the weights in memory). The generator is a full copy, or (generator_lora_rank) a LoRA adapter on a
copy of the teacher's module that shares the teacher's weight tensors, merged into plain weights on export.
Trained networks keep float32 master weights; the frozen teacher may be stored in the compute dtype. The
generator's EMA (of its trained weights) is stepped by the trainer on generator steps only, on the generator's
device or (offload_ema) in CPU memory.

Under FSDP2 (accelerate's `fully_shard`, applied in place) the generator and fake score hold DTensor shards: the EMA
is rebuilt on the shards after wrapping (`reset_ema`), saved and loaded as full tensors, and `export_generator`
gathers the full weights (a collective: every process calls it) into an unsharded copy on the main process.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Sequence

import torch
from torch import nn

from .denoiser import Denoiser, cast_module, merge_adapters, set_adapters, tuner_layers
from .distributed import full_tensor, is_sharded, reshard
from .gan import GANHead
from .generator import Generator, simulate

# the weights frozen right now by Triad.frozen, one list per active context (what a recomputation must see again)
_FROZEN: list[list[nn.Parameter]] = []


@contextlib.contextmanager
def _as_in_forward(groups: tuple, adapters: list) -> None:
    """For one recomputation: the LoRA adapters on or off and the weights frozen as when its forward ran."""
    changed = {d: [layer for layer, was in adapters if was == d and layer.disable_adapters != d] for d in (False, True)}
    for disabled, layers in changed.items():
        if layers:
            set_adapters(layers, not disabled)
    thawed = [p for group in groups for p in group if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)
        for disabled, layers in changed.items():
            if layers:
                set_adapters(layers, disabled)


def _block_tuners(module) -> list:
    """The LoRA layers of a checkpointed block, found once (adapters are added before checkpointing starts)."""
    if not hasattr(module, "_onestep_tuner_layers"):
        module._onestep_tuner_layers = tuner_layers(module)
    return module._onestep_tuner_layers


def _checkpoint(module, *args):
    """diffusers' per-block checkpoint (non-reentrant), recomputed in the backward as its forward ran: with the
    weights frozen or trainable and the LoRA adapters on or off as they were then. DMD2's GAN term and SiD run the
    critic frozen (Triad.frozen), and a LoRA fake score shares its backbone with the teacher (adapters toggled per
    call); the backward comes after the freeze is lifted and after other calls, where a recomputation would
    otherwise compute something else than the forward did (torch.utils.checkpoint's CheckpointError, or wrong
    gradients)."""
    if torch.compiler.is_compiling():  # a compiled graph recomputes inside its own backward, as traced
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
    groups = tuple(_FROZEN)
    adapters = [(layer, layer.disable_adapters) for layer in _block_tuners(module)]
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), _as_in_forward(groups, adapters)))


def enable_gradient_checkpointing(backbones) -> None:
    """Gradient checkpointing of diffusers backbones, safe under Triad.frozen and LoRA toggles (see _checkpoint)."""
    for b in backbones:
        b.enable_gradient_checkpointing(_checkpoint)


FAKE_SCORE_KINDS = ("copy", "lora")
GAN_FEATURE_SOURCES = ("fake_score", "teacher")
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out")


def in_place_ema(parameters, decay: float, offload: bool = False):
    """diffusers' EMAModel (its decay schedule, state dict, copy_to / store / restore) with an update that allocates
    nothing: shadow.lerp_(param, 1 - decay) over the whole list, where EMAModel's foreach update first builds a
    full-size temporary (shadow - param): a copy of the generator's weights at the peak of every generator step.

    `offload`: the shadow weights live in CPU memory and the update runs there, on a copy of the weights staged in
    pinned memory (one device-to-host copy per generator step); the accelerator then holds no EMA at all (SD1.5-size
    generator: 3.2 GiB). Same arithmetic, float32 either way. Loaded states keep each shadow where it lived."""
    from diffusers.training_utils import EMAModel

    class InPlaceEMA(EMAModel):
        offloaded = offload
        _staging: list | None = None

        @torch.no_grad()
        def step(self, parameters, keep: torch.Tensor | None = None) -> None:
            """One EMA update; `keep` (a boolean tensor): False blends with weight 0 (a skipped update, decided on
            the device without a host read)."""
            parameters = list(parameters)
            self.optimization_step += 1
            self.cur_decay_value = decay = self.get_decay(self.optimization_step)
            pairs = list(zip(self.shadow_params, parameters))
            trained = [(s, p.detach()) for s, p in pairs if p.requires_grad]
            if trained:
                shadows, params = [s for s, _ in trained], [p for _, p in trained]
                if self.offloaded:
                    params = self._stage(shadows, params)
                if keep is None:
                    torch._foreach_lerp_(shadows, params, 1.0 - decay)
                else:  # a 0-dim weight per tensor: the same arithmetic, 0 when the update was skipped
                    w = keep.to(shadows[0].device, torch.float32) * (1.0 - decay)
                    torch._foreach_lerp_(shadows, params, [w] * len(shadows))
            for s, p in pairs:
                if not p.requires_grad:
                    s.copy_(p)

        def _stage(self, shadows, params):
            """The weights copied next to their shadows (host buffers, pinned for a CUDA source, reused every step)."""
            if self._staging is None or [b.shape for b in self._staging] != [p.shape for p in params]:
                pin = any(p.is_cuda for p in params)
                self._staging = [torch.empty(p.shape, dtype=p.dtype, device=s.device, pin_memory=pin and s.device.type == "cpu")
                                 for s, p in zip(shadows, params)]
            for b, p in zip(self._staging, params):
                b.copy_(p, non_blocking=True)
            for d in {p.device for p in params if p.is_cuda}:
                torch.cuda.synchronize(d)
            return self._staging

        def state_dict(self) -> dict:
            state = super().state_dict()  # FSDP: shards gathered into full tensors (every process calls this)
            state["shadow_params"] = [full_tensor(s) for s in state["shadow_params"]]
            return state

        def load_state_dict(self, state_dict: dict) -> None:
            old = list(self.shadow_params)
            super().load_state_dict(state_dict)  # accelerate loads to the CPU: back where each shadow lived
            self.shadow_params = [_like(s, o) for s, o in zip(self.shadow_params, old)]

    if offload:
        parameters = [p.detach().to("cpu") for p in parameters]  # never a second copy on the accelerator
    return InPlaceEMA(parameters, decay=decay, foreach=True)


def _like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A full tensor placed like `ref`: on its device, or sharded like it where `ref` is a DTensor."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return value.to(ref.device)


def add_lora(module: nn.Module, targets: Sequence[str], rank: int, name: str) -> None:
    """A peft LoRA adapter (alpha = rank, B = 0: the module computes what it did) on the modules whose names end in
    one of `targets`; its weights float32 and trainable, the module's own weights frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)  # what peft's LoRA adapts
    found = []
    for t in targets:
        hits = [(n, m) for n, m in module.named_modules() if n == t or n.endswith("." + t)]
        bad = [(n, m) for n, m in hits if not isinstance(m, layers)]
        if bad:
            raise ValueError(f"LoRA target {t!r} names {bad[0][0]} ({type(bad[0][1]).__name__}), not a linear, "
                             "convolution or embedding layer; name layers, e.g. to_q,to_v,conv1")
        found += [t] * bool(hits)
    if not found:
        raise ValueError(f"none of the LoRA target modules {list(targets)} exist in the teacher")
    # DDP then warns (once per process) that a gradient's strides differ from its bucket's: a LoRA convolution's
    # (out, r, 1, 1) up-projection gets its gradient with other strides on the size-1 dimensions, the same memory
    # layout, which DDP copies into its bucket either way
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=found, init_lora_weights=True), module,
                            adapter_name=name)
    for n, p in module.named_parameters():
        if "lora_" in n and f".{name}." in f"{n}.":
            p.data = p.data.float()
            p.requires_grad_(True)


class Triad:
    """Holds the three networks; the trainer may swap in distributed wrappers of the trained ones."""

    def __init__(self, generator: Generator, fake_score: Denoiser, teacher: Denoiser,
                 gan_head: GANHead | None = None, gan_feature_source: str = "fake_score", ema_decay: float | None = None,
                 offload_ema: bool = False):
        if gan_feature_source not in GAN_FEATURE_SOURCES:
            raise ValueError(f"gan_feature_source must be one of {GAN_FEATURE_SOURCES}, got {gan_feature_source!r}")
        self.generator, self.fake_score, self.teacher, self.gan_head = generator, fake_score, teacher, gan_head
        self.gan_feature_source = gan_feature_source
        self._raw = {"generator": generator, "fake_score": fake_score, "teacher": teacher, "gan_head": gan_head}
        self.ema, self._ema_decay, self._template = None, ema_decay, None
        self.ema_parameters = [p for p in generator.parameters() if p.requires_grad]  # a LoRA generator: its adapters
        if ema_decay:
            self.ema = in_place_ema(self.ema_parameters, ema_decay, offload=offload_ema)
        trained = {id(p) for p in fake_score.parameters() if p.requires_grad}
        for p in teacher.parameters():  # a LoRA fake score shares the teacher's module: keep its adapters
            if id(p) not in trained:
                p.requires_grad_(False)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: Denoiser, *, fake_score: str = "copy", lora_rank: int = 16,
                     lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS, generator_timesteps: Sequence | None = None,
                     gan_head: bool = False, gan_feature_source: str = "fake_score", sample_shape: Sequence[int] = (),
                     example_cond=None, ema_decay: float | None = None, frozen_dtype: torch.dtype | None = None,
                     gan_hidden: int | None = None, gan_layers: Sequence[str] = ("mid_block",),
                     student_backbone: nn.Module | None = None, clip_sample: float | None = None,
                     fake_from_teacher: bool = False, offload_ema: bool = False, router=None,
                     fake_backbone: nn.Module | None = None, generator_lora_rank: int = 0,
                     generator_lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> "Triad":
        """Generator and fake score initialised from the teacher's weights (DMD, SiD, VSD all start so), or from
        `student_backbone` (another architecture, e.g. a smaller UNet after Teacher Score Matching; a LoRA fake
        score stays on the teacher's weights, and so does a full copy with `fake_from_teacher`).
        With a `router` (multi-student, one shared fake score): the generator is K students behind it
        (`RoutedDenoiser`), from the K backbones in `student_backbone` (a list; None: K copies of the teacher), and
        a full-copy fake score starts from `fake_backbone` (None: the teacher).
        `generator_lora_rank` > 0: the generator trains a LoRA adapter of that rank (on `generator_lora_targets`) on
        the teacher's own weight tensors, shared, not copied (in `frozen_dtype` where given); one student only."""
        if fake_score not in FAKE_SCORE_KINDS:
            raise ValueError(f"fake_score must be one of {FAKE_SCORE_KINDS}, got {fake_score!r}")
        sched, null, pt = teacher.schedule, teacher.null_cond, teacher.prediction_type
        base = teacher.backbone.requires_grad_(False).eval()
        init = base if student_backbone is None else student_backbone
        trained_copy = lambda net: copy.deepcopy(net).float().requires_grad_(True).train()  # noqa: E731
        if generator_lora_rank and (router is not None or student_backbone is not None):
            raise ValueError("a LoRA generator trains on the teacher's own weights: one student of the teacher's "
                             "architecture (no --students K > 1, no --student_channels)")
        if generator_lora_rank:
            student = None  # built below, on the teacher's weights in their stored dtype
        elif router is None:
            student = Denoiser(trained_copy(init), sched, null_cond=null, prediction_type=pt)
        else:
            from .multistudent import RoutedDenoiser

            inits = init if isinstance(init, (list, tuple)) else [init] * router.num_students
            student = RoutedDenoiser([Denoiser(trained_copy(b), sched, null_cond=null, prediction_type=pt)
                                      for b in inits], router)
            init = base if fake_backbone is None else fake_backbone
        fake = None  # a full copy: float32, of the teacher's weights as loaded (before the cast)
        if fake_score == "copy":
            fake = Denoiser(trained_copy(base if fake_from_teacher else init), sched, null_cond=null, prediction_type=pt)
        if frozen_dtype is not None:
            cast_module(base, frozen_dtype)
        if generator_lora_rank:  # new modules over the (cast) weights, before a LoRA fake score's adapter joins them
            shared = copy.deepcopy(base, memo={id(p): p for p in base.parameters()}).train()
            add_lora(shared, generator_lora_targets, generator_lora_rank, "generator")
            student = Denoiser(shared, sched, null_cond=null, prediction_type=pt)
        if fake is None:
            add_lora(base, lora_targets, lora_rank, "fake_score")
            fake = Denoiser(base, sched, null_cond=null, adapters=True, prediction_type=pt)
            teacher_view = Denoiser(base, sched, null_cond=null, adapters=False, prediction_type=pt)
        else:
            teacher_view = Denoiser(base, sched, null_cond=null, prediction_type=pt)
        generator = Generator(student, generator_timesteps, clip_sample)
        head = None
        if gan_head:
            source = fake if gan_feature_source == "fake_score" else teacher_view
            source.feature_layers = tuple(gan_layers)
            head = GANHead.for_denoiser(source, sample_shape, example_cond, hidden=gan_hidden)
        return cls(generator, fake, teacher_view, head, gan_feature_source, ema_decay, offload_ema)

    # ---- parameters and modes -------------------------------------------------------------------
    def raw(self, name: str) -> nn.Module:
        """The unwrapped module behind a role ("generator", "fake_score", "teacher", "gan_head")."""
        return self._raw[name]

    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._raw["generator"].parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        """What the critic turn trains: the fake score's trainable weights (all, or LoRA) and the GAN head."""
        params = [p for p in self._raw["fake_score"].parameters() if p.requires_grad]
        if self._raw["gan_head"] is not None:
            params += list(self._raw["gan_head"].parameters())
        return params

    @property
    def gan_features_net(self) -> Denoiser:
        return self.fake_score if self.gan_feature_source == "fake_score" else self.teacher

    @contextlib.contextmanager
    def frozen(self, *names: str):
        """Use these roles unwrapped with their weights frozen: gradients reach inputs, not parameters."""
        saved = {n: getattr(self, n) for n in names}
        flags = {}
        for n in names:
            module = self._raw[n]
            if module is None:
                continue
            flags[n] = [(p, p.requires_grad) for p in module.parameters()]
            module.requires_grad_(False)
            reshard(module)
            setattr(self, n, module)
        group = [p for n in flags for p, flag in flags[n] if flag]
        _FROZEN.append(group)  # gradient checkpointing's recomputations of these forwards freeze them again
        try:
            yield self
        finally:
            _FROZEN[:] = [g for g in _FROZEN if g is not group]
            for n in names:
                for p, flag in flags.get(n, []):
                    p.requires_grad_(flag)
                if n in flags:
                    reshard(self._raw[n])
                setattr(self, n, saved[n])

    def generate(self, z: torch.Tensor, cond=None, k: int | None = None) -> torch.Tensor:
        """Generator samples for a loss: one step, or backward simulation to a random step k of a few-step student."""
        gen = self._raw["generator"]
        if k is None:
            k = int(torch.randint(0, gen.num_steps, ()).item()) if gen.num_steps > 1 else 0
        return simulate(self.generator, gen.schedule, gen.timesteps, z, cond, k)

    def critic_samples(self, batch: dict) -> torch.Tensor:
        """The critic turn's samples: the generator turn's output of this iteration (batch["generated"], which a
        method's generator turn leaves there), else a no-grad draw of its own (a critic-only iteration)."""
        x = batch.get("generated")
        if x is None:
            with torch.no_grad():
                x = self.generate(batch["z"], batch.get("cond"))
        return x

    # ---- EMA -----------------------------------------------------------------------------------
    def ema_step(self, keep: torch.Tensor | None = None) -> None:
        """Update the generator EMA (call after each generator optimizer step, never on critic steps); `keep`: a
        boolean tensor, False for an update skipped on the device (the EMA then stays as it was)."""
        if self.ema is not None:
            self.ema.step(self.ema_parameters, keep)

    def reset_ema(self) -> None:
        """Rebuild the EMA on the generator's current parameters (after FSDP2 replaced them with shards; the EMA
        starts from the wrapped weights, which equal the ones it was built from)."""
        self.ema_parameters = [p for p in self._raw["generator"].parameters() if p.requires_grad]
        if self.ema is not None:
            self.ema = in_place_ema(self.ema_parameters, self._ema_decay)

    def keep_template(self) -> None:
        """Keep the generator's architecture (meta tensors, no memory) to rebuild an unsharded copy from gathered
        weights; call before FSDP wrapping, on the process that exports."""
        gen = self._raw["generator"]
        buffers = {n for n, _ in gen.named_buffers()} - set(gen.state_dict())
        if buffers:
            raise ValueError(f"the generator has buffers outside its state dict ({sorted(buffers)[0]}); FSDP export "
                             "cannot rebuild them")
        self._template = copy.deepcopy(gen).to("meta")

    def generator_adapter_state(self, use_ema: bool = True) -> dict | None:
        """A LoRA generator's adapter weights (EMA where kept and use_ema is set) under peft's names without the
        adapter's, float32 on the CPU: what diffusers' `save_lora_weights(unet_lora_layers=...)` takes. None for a
        generator trained whole."""
        from peft.utils import get_peft_model_state_dict

        backbone = getattr(self._raw["generator"].denoiser, "backbone", None)
        if "generator" not in getattr(backbone, "peft_config", {}):
            return None
        ema = dict(zip(map(id, self.ema_parameters), self.ema.shadow_params)) if use_ema and self.ema else {}
        state = {n: ema.get(id(p), p).detach().float().cpu().clone() for n, p in backbone.named_parameters()
                 if ".generator." in f"{n}." and "lora_" in n}
        return get_peft_model_state_dict(backbone, state_dict=state, adapter_name="generator")

    def export_generator(self, use_ema: bool = True) -> Generator | None:
        """A float32 copy of the generator, with EMA weights where an EMA is kept and use_ema is set; a LoRA
        generator's adapters merged into plain weights (the teacher's architecture, no peft layers).

        FSDP2: a collective (every process calls it); the full weights are gathered to the main process, which gets
        the unsharded copy (on the teacher's device); the other processes get None."""
        gen = self._raw["generator"]
        if is_sharded(gen):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(gen, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if use_ema and self.ema is not None:  # the EMA's shards, gathered in the same order as the weights
                for (name, _), shadow in zip(gen.named_parameters(), self.ema.shadow_params):
                    value = full_tensor(shadow)
                    if state:
                        state[name] = value.cpu()
            if not state or self._template is None:  # ranks other than 0 receive nothing
                return None
            device = next(self._raw["teacher"].parameters()).device
            out = copy.deepcopy(self._template).to_empty(device=device)
            out.load_state_dict(state, strict=True)
            return out.float().eval().requires_grad_(False)
        kept = {id(p) for p in self.ema_parameters}
        out = copy.deepcopy(gen).float().eval().requires_grad_(False)
        if use_ema and self.ema is not None:
            self.ema.copy_to([q for p, q in zip(gen.parameters(), out.parameters()) if id(p) in kept])
        merge_adapters(out)
        return out

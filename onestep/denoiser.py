"""One contract for every network: x0 = denoiser(x_t, t, cond), float32 out.

`Denoiser` adapts a diffusers backbone (UNet2DModel, class-conditional or not; UNet2DConditionModel;
any model taking `encoder_hidden_states`) plus its `Schedule` to that contract, adds batched
classifier-free guidance and an optional bottleneck-feature hook. No method touches a backbone.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .schedule import Schedule, append_dims, to_device

Cond = torch.Tensor | dict | None
TEXT_TIME_IDS = 6  # SDXL's micro-conditioning: original size (2), crop top-left (2), target size (2)


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a module's floating-point weights to `dtype` in place, keeping the modules a diffusers model lists in
    `_keep_in_fp32_modules` in float32. (diffusers' ModelMixin.to warns on every dtype cast, also when it has
    nothing to keep; this is the cast it asks for, without the warning.)"""
    nn.Module.to(module, dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    for name, sub in module.named_modules():
        if any(k in name.split(".") for k in keep):
            nn.Module.to(sub, torch.float32)
    return module


def pack_text_time(embeds: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL conditions as one tensor (B, L + r, D), so they batch, index and mix like SD's (B, L, D) embeddings.

    Rows 0..L-1 hold the prompt embeddings; the last r rows hold [pooled (P), time ids (6), zero padding] flattened.
    """
    b, _, d = embeds.shape
    extra = torch.cat([pooled.to(embeds), time_ids.to(embeds).expand(b, -1)], dim=1)  # (B, P + 6)
    rows = -(-extra.shape[1] // d)
    extra = torch.nn.functional.pad(extra, (0, rows * d - extra.shape[1])).reshape(b, rows, d)
    return torch.cat([embeds, extra], dim=1)


def unpack_text_time(cond: torch.Tensor, pooled_dim: int) -> dict:
    """The UNet keyword arguments (encoder_hidden_states, added_cond_kwargs) of a pack_text_time tensor."""
    b, n, d = cond.shape
    rows = -(-(pooled_dim + TEXT_TIME_IDS) // d)
    extra = cond[:, n - rows:].reshape(b, rows * d)
    return {"encoder_hidden_states": cond[:, :n - rows],
            "added_cond_kwargs": {"text_embeds": extra[:, :pooled_dim],
                                  "time_ids": extra[:, pooled_dim:pooled_dim + TEXT_TIME_IDS]}}


def text_time_pooled_dim(config) -> int | None:
    """The pooled text embedding width of an SDXL-style UNet ("text_time" added conditioning), else None."""
    if config.get("addition_embed_type") != "text_time":
        return None
    return config["projection_class_embeddings_input_dim"] - TEXT_TIME_IDS * config["addition_time_embed_dim"]


def _cat_cond(a: Cond, b: Cond) -> Cond:
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b])


def _expand(value, cond: Cond) -> Cond:
    """One condition (a class index, a (1, ...) embedding or a dict of them) repeated like a batch `cond`."""
    if isinstance(cond, dict):
        return {k: value[k].expand_as(v) if torch.is_tensor(v) else v for k, v in cond.items()}
    if cond.dtype in (torch.long, torch.int32, torch.int64):
        return torch.full_like(cond, int(value))
    return value.to(cond).expand_as(cond)


def tuner_layers(module: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers inside a module (empty without peft adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def merge_adapters(module: nn.Module) -> nn.Module:
    """Every peft LoRA layer inside `module` merged into its base layer, which takes its place (in place)."""
    tuners = {id(m) for m in tuner_layers(module)}
    for name, layer in [(n, m) for n, m in module.named_modules() if n and id(m) in tuners]:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, layer.get_base_layer())
    return module


def set_adapters(layers: list[nn.Module], enabled: bool) -> None:
    """peft's adapter toggle on these LoRA layers, keeping every weight's requires_grad (the toggle also flips it)."""
    params = [p for layer in layers for p in layer.parameters()]
    flags = [p.requires_grad for p in params]
    for layer in layers:
        layer.enable_adapters(enabled)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)


class _FeaturesReady(Exception):
    """Raised by a feature hook once every feature layer has run: the rest of the backbone is not needed."""


class Denoiser(nn.Module):
    """Wraps a diffusers backbone and its schedule as x0 = D(x_t, t, cond) in float32.

    cond: class labels (LongTensor) for UNet2DModel, text embeddings (B, L, D) (SDXL: pack_text_time's
    (B, L + r, D), unpacked here for UNets with "text_time" added conditioning) or a dict of backbone kwargs
    (encoder_hidden_states, added_cond_kwargs) for text models, None if unconditional.
    null_cond: the condition that means "no condition" (a class index or an embedding): guidance's unconditional
    branch and what condition dropout substitutes.
    guidance_uncond: set (an attribute) to use another unconditional branch in `guided`, e.g. a negative prompt.
    adapters: None leaves peft adapters alone; True / False enables / disables them on every call
    (the LoRA fake score and the teacher share one backbone this way).
    prediction_type: what the backbone predicts, if not the schedule's (e.g. "sample" for an x0 network).
    """

    def __init__(self, backbone: nn.Module, schedule: Schedule, *, null_cond=None, adapters: bool | None = None,
                 prediction_type: str | None = None):
        super().__init__()
        self.backbone, self.schedule, self.null_cond, self.adapters = backbone, schedule, null_cond, adapters
        self.prediction_type = prediction_type
        self.feature_layers: tuple[str, ...] = ("mid_block",)  # modules whose outputs features=True returns
        self.guidance_uncond = None
        self._pooled_dim = text_time_pooled_dim(getattr(backbone, "config", {}))
        self._tuners = tuner_layers(backbone) if adapters is not None else []

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def backbones(self) -> list:
        """The diffusers backbones behind this denoiser: its one (a routed multi-student denoiser has several)."""
        return [self.backbone]

    @property
    def class_conditional(self) -> bool:
        cfg = getattr(self.backbone, "config", {})
        return cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None

    def _backbone_kwargs(self, cond: Cond) -> dict:
        if cond is None:
            return {}
        if isinstance(cond, dict):
            return dict(cond)
        if cond.dtype in (torch.long, torch.int32, torch.int64):
            return {"class_labels": cond}
        if self._pooled_dim is not None:
            return unpack_text_time(cond.to(self.dtype), self._pooled_dim)
        return {"encoder_hidden_states": cond.to(self.dtype)}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None, *, features: bool = False,
                features_only: bool = False):
        """x0 estimate (B, C, H, W) float32; with features=True also a list of the outputs of `feature_layers`.
        features_only=True returns just that list and stops the backbone as soon as the last of them is computed
        (DMD2's classify mode: the decoder's work, which no feature depends on, is skipped)."""
        if self._tuners and getattr(self.backbone, "_onestep_adapters", None) is not self.adapters:
            set_adapters(self._tuners, self.adapters)
            self.backbone._onestep_adapters = self.adapters  # shared by the views of one backbone: toggle on change only
        t = self.schedule.timesteps_tensor(t, x_t.shape[0], x_t.device)
        inp, timestep = self.schedule.model_input(x_t.float(), t)
        stop = features_only and getattr(self.backbone, "_compiled_call_impl", None) is None  # no exits in graphs
        with self._capture(features or features_only, stop) as store:
            try:
                pred = self.backbone(inp.to(self.dtype), timestep, **self._backbone_kwargs(cond), return_dict=False)[0]
            except _FeaturesReady:
                pred = None
        if features_only:
            return [store[n].float() for n in self.feature_layers]
        x0 = self.schedule.to_x0(pred.float(), x_t.float(), t, self.prediction_type)
        return (x0, [store[n].float() for n in self.feature_layers]) if features else x0

    @contextlib.contextmanager
    def _capture(self, on: bool, stop: bool = False):
        store: dict = {}
        if not on:
            yield store
            return
        modules = dict(self.backbone.named_modules())
        handles = []
        for name in self.feature_layers:
            if name not in modules:
                where = "no mid_block" if name == "mid_block" else f"no module {name!r}"
                raise ValueError(f"{type(self.backbone).__name__} has {where} to take GAN features from")
            def hook(module, args, out, name=name):
                store[name] = out[0] if isinstance(out, tuple) else out
                if stop and len(store) == len(self.feature_layers):
                    raise _FeaturesReady

            handles.append(modules[name].register_forward_hook(hook))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def null_like(self, cond: Cond) -> Cond:
        """The unconditional counterpart of a batch of conditions."""
        if self.null_cond is None:
            raise ValueError("classifier-free guidance needs a null condition, and this teacher has none "
                             "(a class-conditional teacher needs a null class; set guidance scale 1)")
        return _expand(self.null_cond, cond)

    def drop_cond(self, cond: Cond, p: float) -> Cond:
        """Each sample's condition replaced by the null condition with probability p (unchanged without a null)."""
        if cond is None or p <= 0 or self.null_cond is None:
            return cond
        null = self.null_like(cond)
        first = next(iter(cond.values())) if isinstance(cond, dict) else cond
        keep = torch.rand(first.shape[0], device=first.device) >= p

        def mix(c, n):
            return torch.where(keep.reshape(-1, *[1] * (c.ndim - 1)), c, n) if torch.is_tensor(c) else c

        return {k: mix(v, null[k]) for k, v in cond.items()} if isinstance(cond, dict) else mix(cond, null)

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, scale, uncond: Cond = None) -> torch.Tensor:
        """Classifier-free guidance x0_u + s (x0_c - x0_u), cond and uncond in one batched forward.

        scale: a float or a (B,) tensor (per-sample scales); scale 1 runs the conditional pass alone.
        """
        if not torch.is_tensor(scale) and scale == 1.0:
            return self(x_t, t, cond)
        if uncond is None:
            uncond = self.null_like(cond) if self.guidance_uncond is None else _expand(self.guidance_uncond, cond)
        t = self.schedule.timesteps_tensor(t, x_t.shape[0], x_t.device)
        x0_c, x0_u = self(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat_cond(cond, uncond)).chunk(2)
        if not torch.is_tensor(scale):  # a number: no tensor made from it (that would be a host-to-device copy)
            return x0_u + float(scale) * (x0_c - x0_u)
        s = append_dims(to_device(scale, x0_c.device).to(x0_c.dtype).expand(x_t.shape[0]), x_t.ndim)
        return x0_u + s * (x0_c - x0_u)

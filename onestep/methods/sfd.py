"""Score Forgetting Distillation (Chen, Zhang, Zhou 2025): SiD plus a forget term.

Each batch splits by condition into remaining (c_r) and forget (c_f) samples; each term is a mean over its part:
    fake:      c_sr * DSM(F; G(z, c_r), c_r) + c_sf * DSM(F; G(z, c_f), c_f)
    generator: c_gr * L_SiD(G(z, c_r); T|c_r, F|c_r) + c_gf * L_SiD(G(z, c_f); T|c_o, F|c_f)
so the teacher, queried with the override ("safe") condition c_o, pulls p_G(.|c_f) toward p_T(.|c_o).
Conditions are class labels or, for text teachers, rows of the prompt-embedding table (forget / override prompts
must be lines of the prompts file). A part whose coefficient is 0 is left out of the loss (its samples are still
generated and graded with the batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import OnestepError
from ..schedule import append_dims, to_device
from .sid import SiD

OVERRIDE_MODES = ("auto", "map", "random", "classifier")


@dataclass
class SFD(SiD):
    """SFD: SiD whose forget-class samples are graded by the teacher at an override class."""

    required_options: ClassVar[tuple] = ("forget",)

    forget: list = field(default_factory=list)    # class labels (text teachers: prompts) to forget, e.g. [3]
    override: list = field(default_factory=list)  # the override ("safe") condition of each forget entry (one: for all)
    override_mode: str = "auto"       # "map" (the `override` list), "random" (a random non-forget condition per
                                      # sample), "classifier" (the digits classifier's pseudo-label of the fake
                                      # score's x0 estimate, forget classes masked); auto: map if override is given,
                                      # else random
    fake_remain_coef: float = 1.0     # c_sr
    fake_forget_coef: float = 0.01    # c_sf
    gen_remain_coef: float = 1.0      # c_gr
    gen_forget_coef: float = 0.01     # c_gf
    forget_warmup: int = 0            # first N iterations: forget terms use t ~ U[warmup_t_min, warmup_t_max] (0: off)
    warmup_t_min: float = 0.02
    warmup_t_max: float = 0.98

    def __post_init__(self):
        super().__post_init__()
        if not self.forget:
            raise ValueError("forget: name the classes (or prompts) to forget, e.g. --forget 3")
        if len(set(map(str, self.forget))) != len(self.forget):
            raise ValueError(f"forget: {self.forget} lists a class twice")
        if self.override_mode not in OVERRIDE_MODES:
            raise ValueError(f"override_mode must be one of {', '.join(OVERRIDE_MODES)}, got {self.override_mode!r}")
        if self.override_mode == "auto":
            self.override_mode = "map" if self.override else "random"
        if self.override_mode == "map":
            if len(self.override) not in (1, len(self.forget)):
                raise ValueError(f"override: give one override per forget entry ({len(self.forget)}) or one for all, "
                                 f"got {self.override}")
            pairs = list(zip(self.forget, self.override * len(self.forget) if len(self.override) == 1 else self.override))
            for f, o in pairs:
                if f == o:
                    raise ValueError(f"override: forget class {f!r} is mapped to itself; its override (safe) class "
                                     "must be a class that is not forgotten")
                if o in self.forget:
                    raise ValueError(f"override: {o!r} (override of {f!r}) is itself a forget class")
            self._pairs = pairs
        elif self.override:
            raise ValueError(f"override: only used with override_mode map, got override_mode {self.override_mode!r}")
        coefs = (self.fake_remain_coef, self.fake_forget_coef, self.gen_remain_coef, self.gen_forget_coef)
        if min(coefs) < 0 or self.forget_warmup < 0:
            raise ValueError(f"coefficients and forget_warmup must be >= 0, got {coefs}, {self.forget_warmup}")
        if not 0 <= self.warmup_t_min <= self.warmup_t_max <= 1:
            raise ValueError(f"warmup_t_min, warmup_t_max must satisfy 0 <= min <= max <= 1, got "
                             f"{self.warmup_t_min}, {self.warmup_t_max}")
        self._table = None

    # ---- which conditions are forgotten, and what replaces them ----------------------------------
    def setup(self, cond_table, keys: list, classifier=None) -> None:
        """Bind to the run's conditions: `cond_table` (N,) labels or (N, L, D) prompt embeddings, `keys` the
        label or prompt of each row; `classifier` (digits) for override_mode classifier."""
        what = "prompt" if cond_table is not None and cond_table.ndim > 1 else "class"

        def row(k) -> int:
            if k not in keys:
                hint = "; a prompt with commas is one item of a YAML list: --forget '[\"a, b\"]'" if what == "prompt" else ""
                raise OnestepError(f"forget/override: {k!r} is not one of this run's {what} conditions "
                                   f"({', '.join(map(repr, keys[:12]))}{' ...' if len(keys) > 12 else ''}){hint}")
            return keys.index(k)

        if cond_table is None:
            raise OnestepError("forget: this teacher is unconditional; SFD forgets classes or prompts")
        if hasattr(cond_table, "require_cached"):  # a prompt table (onestep.prompts.PromptTable)
            cond_table.require_cached("--method sfd")
        forget = [row(k) for k in self.forget]
        remain = [i for i in range(len(keys)) if i not in forget]
        if not remain:
            raise OnestepError(f"forget: {self.forget} would forget every {what} of this run")
        lut = torch.arange(len(keys))
        if self.override_mode == "map":
            for f, o in self._pairs:
                lut[row(f)] = row(o)
        if self.override_mode == "classifier" and (classifier is None or what != "class"):
            raise OnestepError("override_mode: 'classifier' needs a class-conditional 8x8 digits teacher and "
                               "--classifier; use map or random")
        self._table, self._keys, self._classifier = cond_table[:], list(keys), classifier  # every row (a tensor)
        self._forget, self._remain, self._lut = torch.tensor(forget), torch.tensor(remain), lut
        self._copies = {}

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        """One of setup's tables on `device`, copied there once (these lookups run every step)."""
        if (name, device) not in self._copies:
            self._copies[name, device] = to_device(getattr(self, name), device)
        return self._copies[name, device]

    def _rows(self, c: torch.Tensor) -> torch.Tensor:
        """(B,) table row of each condition (nearest row: exact for labels and cached embeddings)."""
        def flat(v: torch.Tensor) -> torch.Tensor:  # (B,) labels or (B, L, D) embeddings -> (B, K) floats
            return (v.flatten(1) if v.ndim > 1 else v[:, None]).float()

        return torch.cdist(flat(c), flat(self._on("_table", c.device))).argmin(1)

    def is_forget(self, c) -> torch.Tensor:
        """(B,) bool: which samples carry a forget condition."""
        if self._table is None:
            raise RuntimeError("SFD.setup(...) must bind the run's conditions before training")
        return torch.isin(self._rows(c), self._on("_forget", c.device))

    def override_cond(self, c: torch.Tensor, forget: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
        """The teacher's conditions: c for remaining samples, the override condition for forget samples."""
        rows, dev = self._rows(c), c.device
        if self.override_mode == "map":
            new = self._on("_lut", dev)[rows]
        elif self.override_mode == "random":
            new = self._on("_remain", dev)[torch.randint(len(self._remain), (len(c),), device=dev)]
        else:  # classifier pseudo-label of the fake score's x0 estimate, restricted to remaining classes
            with torch.no_grad():
                logits = self._classifier(x0_fake.clamp(-1, 1)).float()
            labels = self._on("_table", dev)[self._on("_remain", dev)]
            new = self._on("_remain", dev)[logits[:, labels].argmax(1)]
        return torch.where(append_dims(forget, c.ndim), self._on("_table", dev)[new].to(c.dtype), c)

    def _split(self, per_sample: torch.Tensor, forget: torch.Tensor, c_r: float, c_f: float, name: str, logs: dict):
        """c_r * mean over remaining samples + c_f * mean over forget samples (an empty part adds nothing)."""
        total = per_sample.sum() * 0.0
        if (~forget).any():
            remain = per_sample[~forget].mean()
            total, logs[f"{name}_remain"] = total + c_r * remain, remain.detach()
        if c_f > 0 and forget.any():
            forgot = per_sample[forget].mean()
            total, logs[f"{name}_forget"] = total + c_f * forgot, forgot.detach()
        return total, logs

    def _forget_t(self, sched, t, forget, batch) -> torch.Tensor:
        if batch.get("step", self.forget_warmup) >= self.forget_warmup:
            return t
        return torch.where(forget, sched.sample_t(len(t), self.warmup_t_min, self.warmup_t_max, device=t.device), t)

    # ---- generator turn --------------------------------------------------------------------------
    def generator_loss(self, triad, batch: dict) -> tuple[torch.Tensor, dict]:
        z, c, sched = self.generator_z(batch), batch.get("cond"), triad.teacher.schedule
        x = triad.generate(z, c)
        forget = self.is_forget(c)
        on = self.gen_forget_coef > 0 and bool(forget.any())
        t = self.generator_t(sched, len(z), x.device)
        t = self._forget_t(sched, t, forget, batch) if on else t
        teacher_cond = (lambda x0_fake: self.override_cond(c, forget, x0_fake)) if on else None
        per_sample, logs = self.generator_terms(triad, x, c, t, teacher_cond)
        loss, logs = self._split(per_sample, forget, self.gen_remain_coef, self.gen_forget_coef, "loss_sid", logs)
        return loss, {"loss_sfd": loss.detach(), "forget_share": forget.float().mean().detach(), **logs}

    # ---- critic turn -----------------------------------------------------------------------------
    def fake_score_loss(self, triad, batch: dict) -> tuple[torch.Tensor, dict]:
        z, c, sched = batch["z"], batch.get("cond"), triad.teacher.schedule
        with torch.no_grad():
            x = triad.generate(z, c)
        forget = self.is_forget(c)
        t = self.fake_timesteps(sched, len(z), x.device)
        t = self._forget_t(sched, t, forget, batch) if self.fake_forget_coef > 0 and forget.any() else t
        loss, logs = self._split(self.fake_terms(triad, x, c, t), forget, self.fake_remain_coef,
                                 self.fake_forget_coef, "loss_fake", {})
        return loss, {"loss_fake": loss.detach(), **logs}

    # ---- evaluation --------------------------------------------------------------------------------
    def extra_metrics(self, sample, classifier=None, num_samples: int = 2000, sample_shape=(), device="cpu") -> dict:
        """metrics.json["forgetting"]: what was forgotten and, with the digits classifier, UA and remaining FID."""
        from ..forgetting import forgetting_metrics

        out = {"forget": list(self.forget), "override_mode": self.override_mode,
               "override": [o for _, o in self._pairs] if self.override_mode == "map" else None}
        if classifier is not None and self._table is not None and self._table.ndim == 1:
            labels = self._table.tolist()
            out.update(forgetting_metrics(sample, classifier, [labels[i] for i in self._forget.tolist()],
                                          [labels[i] for i in self._remain.tolist()], num_samples, sample_shape,
                                          device=device))
        return {"forgetting": out}

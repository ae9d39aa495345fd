"""VSD / SwiftBrush (Nguyen & Tran 2024), with SNOOPI's PG-SB random guidance scale.

Generator: t ~ U[2%, 98%], x_t = alpha_t x + sigma_t eps; both branches under CFG at the same scale kappa;
g = sigma_t^2 (eps_T - eps_F) = alpha_t sigma_t (x0_fake - x0_real); L = 0.5 mean((x - sg(x - g))^2).
Fake score (a LoRA on the teacher by default): on sg(G(z)) (the generator turn's output, reused), t ~ U over the
full range, the condition dropped to null with p = 0.1, eps-MSE weighted by abar_t = alpha_t^2. One fake-score step
per generator step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..schedule import append_dims
from .dmd import NATIVE_LOSS_SPACE, dm_surrogate, weighted_dsm


def vsd_gradient(schedule, t: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """SwiftBrush's sigma^2-weighted score difference in x0 terms: alpha_t sigma_t (x0_fake - x0_real)."""
    a, s = schedule.alpha_sigma(t)
    grad = append_dims((a * s).to(x0_real), x0_real.ndim) * (x0_fake - x0_real)
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class VSD:
    """VSD (SwiftBrush): sigma^2-weighted score difference, LoRA fake score with condition dropout, 1:1 updates."""

    preferred_fake_score: ClassVar[str] = "lora"  # what config fake_score "auto" picks for this method

    update_ratio: int = 1              # fake-score steps per generator step (SwiftBrush: 1)
    real_guidance_scale: float = 4.5   # kappa: CFG scale of the teacher and fake branches (SwiftBrush SD2.1: 4.5)
    random_guidance: bool = False      # PG-SB: kappa ~ U(kappa_min, kappa_max), by default per sample and shared by both
                                       # branches
    kappa_min: float = 0.5
    kappa_max: float = 4.0
    kappa_draw: str = "sample"         # PG-SB: one kappa per "sample" (SNOOPI) or one per "batch"
    kappa_shared: bool = True          # PG-SB: the fake branch uses the teacher's draw (SNOOPI); false: a draw of its own
    fake_guidance: bool = True         # guide the fake branch with the same kappa (METHODS §2); off: conditional only
    t_min: float = 0.02                # generator timesteps ~ U[t_min, t_max] as fractions of the schedule's range
    t_max: float = 0.98
    cond_dropout: float = 0.1          # fake-score loss: probability of replacing a sample's condition by the null one
    fake_loss_space: str = "auto"      # DSM space of the fake score; auto: eps (VP), edm (EDM), flow (flow)
    fake_abar_weight: bool = True      # weight the fake score's DSM by abar_t = alpha_t^2 (SwiftBrush)
    fake_first: bool = False           # order within an iteration: critic before generator

    def __post_init__(self):
        if self.update_ratio < 1:
            raise ValueError(f"update_ratio: must be >= 1, got {self.update_ratio}")
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise ValueError(f"t_min, t_max must satisfy 0 <= t_min <= t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.random_guidance and not 0 <= self.kappa_min <= self.kappa_max:
            raise ValueError(f"kappa_min, kappa_max must satisfy 0 <= kappa_min <= kappa_max, got "
                             f"{self.kappa_min}, {self.kappa_max}")
        if self.kappa_draw not in ("sample", "batch"):
            raise ValueError(f"kappa_draw must be 'sample' or 'batch', got {self.kappa_draw!r}")
        if not 0 <= self.cond_dropout <= 1:
            raise ValueError(f"cond_dropout must be in [0, 1], got {self.cond_dropout}")

    @property
    def needs_real_images(self) -> bool:
        return False

    @property
    def uses_guidance(self) -> bool:
        """Whether the losses need the teacher's null condition."""
        return self.random_guidance or self.real_guidance_scale != 1.0

    def is_generator_step(self, step: int) -> bool:
        return step % self.update_ratio == 0

    def loss_space(self, schedule) -> str:
        return NATIVE_LOSS_SPACE[schedule.kind] if self.fake_loss_space == "auto" else self.fake_loss_space

    def guidance_scale(self, n: int, device) -> float | torch.Tensor:
        """kappa: the fixed scale, or PG-SB's draw (B,) from U(kappa_min, kappa_max), per sample or one per batch."""
        if not self.random_guidance:
            return self.real_guidance_scale
        u = torch.rand(n if self.kappa_draw == "sample" else 1, device=device).expand(n)
        return self.kappa_min + (self.kappa_max - self.kappa_min) * u

    # ---- generator turn --------------------------------------------------------------------------
    def generator_loss(self, triad, batch: dict) -> tuple[torch.Tensor, dict]:
        z, c = batch["z"], batch.get("cond")
        n, sched = z.shape[0], triad.teacher.schedule
        x = triad.generate(z, c)
        batch["generated"] = x.detach()  # the critic turn of this iteration trains on it (SwiftBrush)
        with torch.no_grad(), triad.frozen("fake_score"):  # unwrapped: .guided, and no DDP reducer on the fake score
            t = sched.sample_t(n, self.t_min, self.t_max, device=x.device)
            x_t = sched.add_noise(x, torch.randn_like(x), t)
            kappa = self.guidance_scale(n, x.device)  # one draw, shared by both branches (kappa_shared)
            x0_real = triad.teacher.guided(x_t, t, c, kappa)
            kappa_f = kappa if self.kappa_shared else self.guidance_scale(n, x.device)
            x0_fake = triad.fake_score.guided(x_t, t, c, kappa_f if self.fake_guidance else 1.0)
            grad = vsd_gradient(sched, t, x0_real, x0_fake)
        loss = dm_surrogate(x, grad)
        logs = {"loss_vsd": loss.detach(), "vsd_grad_norm": grad.flatten(1).norm(dim=1).mean().detach()}
        if torch.is_tensor(kappa):
            logs["kappa"] = kappa.mean().detach()
        return loss, logs

    # ---- critic turn -----------------------------------------------------------------------------
    def fake_score_loss(self, triad, batch: dict) -> tuple[torch.Tensor, dict]:
        z, c = batch["z"], batch.get("cond")
        n, sched = z.shape[0], triad.teacher.schedule
        x = triad.critic_samples(batch)
        t = sched.sample_t(n, 0.0, 1.0, device=x.device)
        x_t = sched.add_noise(x, torch.randn_like(x), t)
        c_in = triad.teacher.drop_cond(c, self.cond_dropout)  # the teacher view holds the same null condition
        loss = weighted_dsm(sched, t, triad.fake_score(x_t, t, c_in), x, self.loss_space(sched))
        if self.fake_abar_weight:
            loss = loss * sched.alpha_sigma(t)[0].to(loss).square()
        loss = loss.mean()
        return loss, {"loss_fake": loss.detach()}

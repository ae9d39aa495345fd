"""SiD: Score identity Distillation (Zhou et al. 2024).

Generator, per sample, with y_t = alpha_t x + sigma_t eps, f_T = T(y_t), f_F = F(y_t):
    L_G = sum_pix (f_T - f_F) * ((f_T - x) - alpha (f_T - f_F)) / w,   w = sg(mean_chw |x - f_T|) >= 1e-5.
Gradients reach x directly and through T and F with respect to their input (both frozen, not under no_grad).
Fake score: denoising loss on sg(G(z)) (EDM: ln sigma ~ N(-1.2, 1.2^2), EDM's lambda weighting). 1:1, fake first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from .dmd import NATIVE_LOSS_SPACE, weighted_dsm

FAKE_T_CHOICES = ("auto", "lognormal", "generator", "full")
T_GRID_CHOICES = ("uniform", "karras")


def sid_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, alpha: float,
             eps: float = 1e-5) -> torch.Tensor:
    """SiD's per-sample generator loss (B,): sum_pix (f_T - f_F)((f_T - x) - alpha (f_T - f_F)) / sg(mean|x - f_T|)."""
    dims = tuple(range(1, x.ndim))
    w = (x - x0_real).abs().mean(dim=dims).clamp_min(eps).detach()
    diff = x0_real - x0_fake
    loss = (diff * ((x0_real - x) - alpha * diff)).sum(dim=dims) / w
    # SiD's release drops non-finite samples from the loss; their gradients stay non-finite (a sample's NaN
    # reaches the generator through T's and F's backward too), so the trainer's non-finite check skips such an update
    return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))


@dataclass
class SiD:
    """SiD: the alpha-weighted score-identity loss through both score networks; 1:1 updates, fake score first."""

    # run settings SiD uses where the preset, a config file or the command line does not set them: Adam betas (0, 0.999)
    preferred_config: ClassVar[dict] = {"adam_beta1": 0.0}

    update_ratio: int = 1             # fake-score steps per generator step (SiD: 1)
    alpha: float = 1.2                # SiD's alpha (1.2; 1.0 for AFHQ)
    sigma_init: float = 2.5           # EDM teachers: the generator's sigma when --generator_timesteps is not given
                                      # (SiD: 2.5; DMD / DMD2 start at the schedule's top, sigma_max = 80)
    t_min: float = 0.0                # generator-loss timesteps ~ U[t_min, t_max], fractions of the schedule's range
    t_max: float = 0.8                # (EDM: along the rho grid); SiD: t <= 800/1000, sigma <= ~24
    t_grid: str = "uniform"           # what [t_min, t_max] are fractions of on non-EDM teachers: "uniform" (the
                                      # teacher's own timesteps), "karras" (SiD's EDM grid sigma_min 0.002 .. sigma_max
                                      # 80, rho 7, each sigma taken to the time with the same sigma/alpha)
    weight_eps: float = 1e-5          # clamp of w = mean_chw|x - f_T|
    fake_t: str = "auto"              # fake-loss timesteps: "lognormal" (ln sigma ~ N(p_mean, p_std^2); VP / flow: the
                                      # times with that sigma/alpha), "generator" (U[t_min, t_max]), "full" (U over
                                      # the whole range);
                                      # auto: lognormal for EDM teachers, generator otherwise (SFD's DDPM release)
    p_mean: float = -1.2              # EDM's log-normal sigma distribution of the fake loss
    p_std: float = 1.2
    fake_loss_space: str = "auto"     # DSM space of the fake score; auto: eps (VP), edm (EDM), flow (flow)
    fake_first: bool = True           # SiD: the fake score's step comes first in each iteration
    generator_noise: str = "fresh"    # the generator turn's noise: "fresh" (its own draw, as SiD's release), "shared"
                                      # (the batch's: the samples the fake score's step just trained on)

    def __post_init__(self):
        if self.update_ratio < 1:
            raise ValueError(f"update_ratio: must be >= 1, got {self.update_ratio}")
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise ValueError(f"t_min, t_max must satisfy 0 <= t_min <= t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.t_grid not in T_GRID_CHOICES:
            raise ValueError(f"t_grid must be one of {', '.join(T_GRID_CHOICES)}, got {self.t_grid!r}")
        if not self.sigma_init > 0:
            raise ValueError(f"sigma_init must be > 0, got {self.sigma_init}")
        if self.fake_t not in FAKE_T_CHOICES:
            raise ValueError(f"fake_t must be one of {', '.join(FAKE_T_CHOICES)}, got {self.fake_t!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0 (SiD: 1.2), got {self.alpha}")
        if self.generator_noise not in ("fresh", "shared"):
            raise ValueError(f"generator_noise must be fresh or shared, got {self.generator_noise!r}")
        if self.p_std <= 0 or self.weight_eps <= 0:
            raise ValueError(f"p_std and weight_eps must be > 0, got {self.p_std}, {self.weight_eps}")

    @property
    def needs_real_images(self) -> bool:
        return False

    def is_generator_step(self, step: int) -> bool:
        return step % self.update_ratio == 0

    def loss_space(self, schedule) -> str:
        return NATIVE_LOSS_SPACE[schedule.kind] if self.fake_loss_space == "auto" else self.fake_loss_space

    # ---- timesteps -----------------------------------------------------------------------------
    def generator_t(self, schedule, n: int, device) -> torch.Tensor:
        if self.t_grid == "karras":
            return schedule.sample_t_karras(n, self.t_min, self.t_max, device=device)
        return schedule.sample_t(n, self.t_min, self.t_max, device=device)

    def fake_timesteps(self, schedule, n: int, device) -> torch.Tensor:
        mode = self.fake_t if self.fake_t != "auto" else ("lognormal" if schedule.kind == "edm" else "generator")
        if mode == "lognormal":
            return schedule.sample_t_lognormal(n, self.p_mean, self.p_std, device=device)
        if mode == "generator":
            return self.generator_t(schedule, n, device)
        return schedule.sample_t(n, 0.0, 1.0, device=device)

    # ---- per-sample terms (SFD weights them by class) --------------------------------------------
    def generator_terms(self, triad, x: torch.Tensor, cond, t: torch.Tensor,
                        teacher_cond: Callable | None = None) -> tuple[torch.Tensor, dict]:
        """Per-sample SiD loss (B,) of generated x at timesteps t; the fake score sees `cond`, the teacher
        `teacher_cond(x0_fake)` (default: `cond`). Gradients reach x through both frozen score networks."""
        sched = triad.teacher.schedule
        x_t = sched.add_noise(x, torch.randn_like(x), t)
        with triad.frozen("fake_score"):  # unwrapped, weights frozen: gradients reach x_t, not the parameters
            x0_fake = triad.fake_score(x_t, t, cond)
            c_real = cond if teacher_cond is None else teacher_cond(x0_fake.detach())
            x0_real = triad.teacher(x_t, t, c_real)
        loss = sid_loss(x, x0_real, x0_fake, self.alpha, self.weight_eps)
        return loss, {"score_gap": (x0_real - x0_fake).detach().flatten(1).norm(dim=1).mean().detach()}

    def fake_terms(self, triad, x: torch.Tensor, cond, t: torch.Tensor) -> torch.Tensor:
        """Per-sample denoising loss (B,) of the fake score on sg(x) at timesteps t."""
        sched = triad.teacher.schedule
        x_t = sched.add_noise(x, torch.randn_like(x), t)
        return weighted_dsm(sched, t, triad.fake_score(x_t, t, cond), x, self.loss_space(sched))

    # ---- generator turn --------------------------------------------------------------------------
    def generator_z(self, batch: dict) -> torch.Tensor:
        """The generator turn's noise: a fresh draw, or the batch's (which the fake score's step used)."""
        return torch.randn_like(batch["z"]) if self.generator_noise == "fresh" else batch["z"]

    def generator_loss(self, triad, batch: dict) -> tuple[torch.Tensor, dict]:
        z, c = self.generator_z(batch), batch.get("cond")
        x = triad.generate(z, c)
        loss, logs = self.generator_terms(triad, x, c, self.generator_t(triad.teacher.schedule, len(z), x.device))
        loss = loss.mean()
        return loss, {"loss_sid": loss.detach(), **logs}

    # ---- critic turn -----------------------------------------------------------------------------
    def fake_score_loss(self, triad, batch: dict) -> tuple[torch.Tensor, dict]:
        z, c = batch["z"], batch.get("cond")
        with torch.no_grad():
            x = triad.generate(z, c)
        loss = self.fake_terms(triad, x, c, self.fake_timesteps(triad.teacher.schedule, len(z), x.device)).mean()
        return loss, {"loss_fake": loss.detach()}

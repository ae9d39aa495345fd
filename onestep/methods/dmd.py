"""DMD (Yin et al. 2023) and DMD2 (Yin et al. 2024): distribution matching distillation.

Generator: L_DM = 0.5 * mean((x - sg(x - grad))^2), grad = (x0_fake - x0_real) / mean_chw|x - x0_real|,
plus optionally the DMD1 regression loss on teacher ODE pairs and DMD2's non-saturating GAN loss.
Fake score: denoising score matching on sg(G(z)) (+ the GAN critic loss on its bottleneck).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..regression import DISTANCES, regression_distance, regression_pairs
from ..schedule import append_dims, to_device

NATIVE_LOSS_SPACE = {"vp": "epsilon", "edm": "edm", "flow": "flow"}


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, norm: torch.Tensor | None = None,
                eps: float = 1e-5) -> torch.Tensor:
    """DMD's direction (x0_fake - x0_real) / norm; norm defaults to mean_chw|x - x0_real| (per sample)."""
    if norm is None:
        norm = (x - x0_real).abs().mean(dim=tuple(range(1, x.ndim)))
    grad = (x0_fake - x0_real) / append_dims(norm.clamp_min(eps), x.ndim)
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dm_surrogate(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x - sg(x - grad))^2): its gradient w.r.t. x is grad / numel."""
    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())


def weighted_dsm(schedule, t: torch.Tensor, x0_pred: torch.Tensor, x0: torch.Tensor, space: str) -> torch.Tensor:
    """Per-sample denoising loss: the x0-MSE weighted so it equals the MSE in `space` (eps, v, x0, flow, edm)."""
    err = (x0_pred - x0.float()).square().mean(dim=tuple(range(1, x0.ndim)))
    return schedule.loss_weight(t, space).to(err) * err


@dataclass
class DMD:
    """DMD: DM gradient + fake-score DSM, 1:1 updates, optional regression loss on teacher ODE pairs."""

    update_ratio: int = 1             # fake-score steps per generator step (TTUR)
    real_guidance_scale: float = 1.0  # CFG scale of the teacher ("real score") branch; 1 = conditional only
    t_min: float = 0.02               # DM timesteps ~ U[t_min, t_max] as fractions of the schedule's range
    t_max: float = 0.98
    norm_eps: float = 1e-5            # clamp of the mean-absolute normaliser
    fake_loss_space: str = "auto"     # DSM space of the fake score; auto: eps (VP), edm (EDM), flow (flow)
    regression_weight: float = 0.0    # DMD1 lambda_reg on (z, teacher ODE(z)) pairs; 0 = off
    regression_pairs: int = 512       # how many pairs to precompute with the teacher's ODE sampler
    regression_steps: int = 50        # teacher sampler steps (DDIM, deterministic) per pair
    regression_batch: int = 16        # pairs per generator step
    regression_distance: str = "mse"  # d: "mse", or "teacher": the MSE of the teacher's mid-block features on both
                                      # noised to regression_feature_t (a feature distance; onestep/regression.py)
    regression_feature_t: float = 0.0  # "teacher": that noise level, a fraction of the schedule's range
    gan_generator_weight: float = 0.0  # DMD2 lambda_gen for the non-saturating generator GAN loss; 0 = no GAN
    gan_critic_weight: float = 0.0    # DMD2 lambda_cls for the discriminator loss in the critic turn
    gan_t_max: float = 1.0            # GAN inputs are noised at t ~ U[0, gan_t_max) (fraction of the schedule's range)
    gan_start: int = 0                # iterations of DM alone before the GAN terms join (MSD: DM, then DM + GAN)
    fake_first: bool = False          # order within an iteration: critic before generator
    shared_critic_pass: bool = False  # the critic turn's denoising loss reuses the generator turn's fake-score forward
                                      # (same x_t and t, so its t ~ U[t_min, t_max]): one forward fewer per iteration

    def __post_init__(self):
        if self.update_ratio < 1 or self.gan_start < 0:
            raise ValueError(f"update_ratio: must be >= 1, got {self.update_ratio}" if self.update_ratio < 1 else
                             f"gan_start: must be >= 0, got {self.gan_start}")
        if self.shared_critic_pass and self.fake_first:
            raise ValueError("shared_critic_pass reuses the generator turn's forward in the critic turn after it; "
                             "it cannot run with fake_first (critic first): drop one of them")
        if self.shared_critic_pass and "shared_critic_pass" in self.refused_options():
            raise ValueError(f"shared_critic_pass: {type(self).__name__.lower()}'s generator turn does not share its "
                             "fake-score forward; use false (or --method dmd / dmd2)")
        if self.regression_distance not in DISTANCES or not 0 <= self.regression_feature_t <= 1:
            raise ValueError(f"regression_distance must be one of {', '.join(DISTANCES)} and regression_feature_t in "
                             f"[0, 1], got {self.regression_distance!r}, {self.regression_feature_t}")
        if not 0 < self.gan_t_max <= 1:
            raise ValueError(f"gan_t_max must be in (0, 1], got {self.gan_t_max}")
        self._pairs = None

    @classmethod
    def refused_options(cls) -> set[str]:
        """Inherited options this method refuses (a method with its own generator turn shares no critic pass)."""
        return set() if cls.generator_loss is DMD.generator_loss else {"shared_critic_pass"}

    @property
    def uses_gan(self) -> bool:
        return self.gan_generator_weight > 0 or self.gan_critic_weight > 0

    @property
    def needs_real_images(self) -> bool:
        return self.uses_gan

    def is_generator_step(self, step: int) -> bool:
        return step % self.update_ratio == 0

    def loss_space(self, schedule) -> str:
        return NATIVE_LOSS_SPACE[schedule.kind] if self.fake_loss_space == "auto" else self.fake_loss_space

    # ---- optional precomputation ---------------------------------------------------------------
    def prepare(self, triad, cond_sampler, sample_shape, device, seed: int = 0) -> None:
        """DMD1: draw regression pairs (z, y = teacher ODE(z)) with a fixed seed (identical on every process)."""
        if self.regression_weight > 0:
            self._pairs = regression_pairs(triad, cond_sampler, sample_shape, device, seed, self.regression_pairs,
                                           self.regression_steps, self.real_guidance_scale)

    # ---- generator turn --------------------------------------------------------------------------
    def generator_loss(self, triad, batch: dict) -> tuple[torch.Tensor, dict]:
        z, c = batch["z"], batch.get("cond")
        n, sched = z.shape[0], triad.teacher.schedule
        reg = self._pairs is not None and self.regression_weight > 0
        if reg:  # one generator call for both the DM and the regression samples
            idx = torch.randint(0, len(self._pairs[0]), (self.regression_batch,))
            z_ref, c_ref, y_ref = (None if v is None else to_device(v[idx], z.device) for v in self._pairs)
            z = torch.cat([z, z_ref])
            c = None if c is None else torch.cat([c, c_ref])
        x_all = triad.generate(z, c)
        x, cond = x_all[:n], None if c is None else c[:n]
        batch["generated"] = x.detach()  # the critic turn of this iteration trains on it (as DMD2's code does)

        shared = self.shared_critic_pass and torch.is_grad_enabled()
        with torch.no_grad():
            t = sched.sample_t(n, self.t_min, self.t_max, device=x.device)
            x_t = sched.add_noise(x, torch.randn_like(x), t)
            x0_real = triad.teacher.guided(x_t, t, cond, self.real_guidance_scale)
        with torch.set_grad_enabled(shared):  # shared: graded w.r.t. the fake score's weights only (x_t is detached)
            x0_fake = triad.fake_score(x_t, t, cond)
        if shared:
            batch["critic_pass"] = (t, x0_fake)  # the critic turn's prediction
        grad = dm_gradient(x.detach(), x0_real, x0_fake.detach(), eps=self.norm_eps)
        loss_dm = dm_surrogate(x, grad)
        loss, logs = loss_dm, {"loss_dm": loss_dm.detach(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean().detach()}

        if reg:
            loss_reg = regression_distance(self.regression_distance, triad, x_all[n:], y_ref, c_ref,
                                           self.regression_feature_t)
            loss = loss + self.regression_weight * loss_reg
            logs["loss_reg"] = loss_reg.detach()
        if self.gan_generator_weight > 0 and batch.get("step", 0) >= self.gan_start:
            loss_gan = self.gan_generator_term(triad, x, cond)
            loss = loss + self.gan_generator_weight * loss_gan
            logs["loss_gan_g"] = loss_gan.detach()
        return loss, logs

    def gan_generator_term(self, triad, x: torch.Tensor, cond) -> torch.Tensor:
        """DMD2's non-saturating generator loss: softplus(-D(x_t)) with x noised at t < gan_t_max, critic frozen."""
        sched = triad.teacher.schedule
        t_g = sched.sample_t(x.shape[0], 0.0, self.gan_t_max, device=x.device)
        x_tg = sched.add_noise(x, torch.randn_like(x), t_g)
        with triad.frozen("fake_score", "gan_head"):
            feats = triad.gan_features_net(x_tg, t_g, cond, features_only=True)
            return F.softplus(-triad.gan_head(feats)).mean()

    # ---- critic turn -----------------------------------------------------------------------------
    def fake_score_loss(self, triad, batch: dict) -> tuple[torch.Tensor, dict]:
        c, sched, n = batch.get("cond"), triad.teacher.schedule, batch["z"].shape[0]
        x = triad.critic_samples(batch)
        shared = batch.pop("critic_pass", None)  # (t, prediction) of the generator turn's fake-score forward
        if shared is not None:
            t, x0_pred = shared
        else:
            t = sched.sample_t(n, 0.0, 1.0, device=x.device)
            x_t = sched.add_noise(x, torch.randn_like(x), t)
            x0_pred = triad.fake_score(x_t, t, c)
        loss_fake = weighted_dsm(sched, t, x0_pred, x, self.loss_space(sched)).mean()
        if not self.uses_gan or batch.get("step", 0) < self.gan_start:
            return loss_fake, {"loss_fake": loss_fake.detach()}

        # GAN: noise generated and real images at t ~ U[0, T) and classify the bottleneck features.
        real, c_real = batch["real"][:n], batch.get("real_cond")
        t_g = sched.sample_t(2 * n, 0.0, self.gan_t_max, device=x.device)
        gan_in = sched.add_noise(torch.cat([x, real.float()]), torch.randn(2 * n, *x.shape[1:], device=x.device), t_g)
        gan_c = None if c is None else torch.cat([c, c_real[:n]])
        if triad.gan_feature_source == "fake_score":  # encoder + mid-block only (DMD2's classify mode)
            feats = triad.fake_score(gan_in, t_g, gan_c, features_only=True)
        else:
            with torch.no_grad():
                feats = triad.teacher(gan_in, t_g, gan_c, features_only=True)
        logits = triad.gan_head(feats)
        loss_cls = F.softplus(logits[:n]).mean() + F.softplus(-logits[n:]).mean()
        loss = loss_fake + self.gan_critic_weight * loss_cls
        return loss, {"loss_fake": loss_fake.detach(), "loss_gan_d": loss_cls.detach(),
                      "d_real": torch.sigmoid(logits[n:]).mean().detach(), "d_fake": torch.sigmoid(logits[:n]).mean().detach()}


@dataclass
class DMD2(DMD):
    """DMD2: TTUR (5 fake-score steps per generator step), no regression loss, GAN on the fake score."""

    update_ratio: int = 5
    gan_generator_weight: float = 3e-3
    gan_critic_weight: float = 1e-2

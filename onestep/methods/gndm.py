"""GNDM: distribution matching as a group-normalised reward R_dm, with external rewards (GNDMR) and importance
sampling. The paper states only the outline (no code): the formulas are derived (README "GNDM").

- Groups: B/G conditions per batch, G samples each (different noise; shared_t: one DM timestep per group); DMD's
  normaliser 1 / mean_chw|x_i - x0_real,i| becomes 1 / (the group mean of those).
- Advantage A_i: the DM reward r_i ("elbo" 0.5 (L_fake - L_teacher) at the DM timestep, ~ log p_T(x) - log p_fake(x);
  "dm_norm" -||g_i||) and each external reward, standardised within the group, weighted, summed, standardised again.
  DM direction i is weighted by exp(beta A_i) / group mean of exp(beta A). Differentiable rewards also add
  -sum_k lambda_k R_k(x), lambda_k = weight_k / running std of R_k.
- Importance sampling (few-step students): a rollout is reused `reuse` times; likelihood ratios rho of its Gaussian
  re-noising steps, clipped to 1 +- clip_range, weight the DM term; the PPO term -min(rho A, clip(rho) A) / numel
  (pg_weight) trains the chain. With group_size 1 and no rewards every advantage is 0: the update is DMD's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import OnestepError
from ..forgetting import forget_class_figures
from ..generator import renoise_log_ratios, simulate
from ..rewards import RewardSet, check_specs, group_mean, group_standardise, repeat_groups
from ..runs import flatten_state, unflatten_state
from ..schedule import append_dims
from .dmd import DMD, dm_gradient, dm_surrogate, weighted_dsm

CHOICES = {"advantage": ("elbo", "dm_norm", "none"), "normaliser": ("group", "sample")}


@dataclass
class GNDM(DMD):
    """GNDM: DMD on groups of G samples per condition; group normaliser; advantage-weighted DM directions."""

    group_size: int = 4               # G samples per condition (different noise); B/G conditions per batch
    normaliser: str = "group"         # DM normaliser: "group" (mean over the group) or "sample" (DMD's)
    advantage: str = "elbo"           # DM reward behind the advantage: "elbo", "dm_norm" or "none"
    advantage_scale: float = 0.5      # beta in the weights exp(beta A_i) / group mean (0: advantages unused)
    advantage_eps: float = 1e-4       # A = (r - mean) / (std + eps) within a group
    shared_t: bool = True             # one DM timestep per group (samples compared at the same noise level)
    rewards: list = field(default_factory=list)          # external rewards: classifier, clip, pkg.module:function
    reward_weights: list = field(default_factory=list)   # one per reward (default 1)
    reward_gradient_weight: float = 0.0  # differentiable rewards also as -sum_k lambda_k R_k(x) (0: advantage only)
    reward_decay: float = 0.9         # EMA decay of each reward's variance (the adaptive weights)
    reward_eps: float = 1e-3          # lambda_k = weight_k / (running std + reward_eps)
    clip_model: str = "openai/clip-vit-base-patch32"  # reward clip: a local folder or hub-cache id
    clip_prompt: str = "a handwritten digit {}"       # reward clip, class teachers: the text of label {}
    reuse: int = 1                    # few-step students: updates per rollout (importance-sampled)
    clip_range: float = 0.2           # likelihood ratios clipped to [1 - clip_range, 1 + clip_range]
    pg_weight: float = 0.0            # few-step students: weight of the PPO term on the re-noising chain

    def __post_init__(self):
        super().__post_init__()
        if self.regression_weight > 0:
            raise ValueError("regression_weight: gndm has no DMD1 regression loss; use 0 (or --method dmd)")
        if self.group_size < 1 or self.reuse < 1:
            raise ValueError(f"group_size and reuse must be >= 1, got {self.group_size}, {self.reuse}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not 0 < self.clip_range < 1 or not 0 <= self.reward_decay < 1 or min(self.pg_weight, self.reward_eps) < 0:
            raise ValueError(f"need 0 < clip_range < 1, 0 <= reward_decay < 1, pg_weight >= 0, reward_eps >= 0; got "
                             f"{self.clip_range}, {self.reward_decay}, {self.pg_weight}, {self.reward_eps}")
        self.rewards = check_specs(self.rewards)  # an unknown name or an import error is reported before training
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights: {self.reward_weights} for rewards {self.rewards}; give one per reward")
        self._reward_set, self._roll, self._shape, self._device, self._labels = RewardSet({}), None, (), "cpu", None

    # ---- binding to the run ----------------------------------------------------------------------
    def prepare(self, triad, cond_sampler, sample_shape, device, seed: int = 0) -> None:
        """Keep the sample shape; refuse reuse / pg_weight for one-step students (no stochastic chain to reweight)."""
        self._shape, self._device = tuple(sample_shape), device
        for key, off in (("reuse", 1), ("pg_weight", 0)):  # both act through a few-step student's re-noising chain
            if getattr(self, key) != off and triad.raw("generator").num_steps == 1:
                raise OnestepError(f"{key}: {getattr(self, key)} acts through the likelihood ratios of a few-step student; "
                                   f"this one has one step: use {key} {off}, or --generator_timesteps 300,150 (digits)")

    def setup(self, cond_table, keys: list, classifier=None) -> None:
        """Build the external rewards for this run's conditions and check each returns one score per image."""
        self._labels = list(keys) if cond_table is not None and cond_table.ndim == 1 else None
        if not self.rewards:
            return
        self._reward_set = RewardSet.from_specs(
            self.rewards, self.reward_weights, self.reward_decay, self.reward_eps, cond_table=cond_table,
            sample_shape=self._shape, device=self._device, classifier=classifier, keys=keys,
            clip_model=self.clip_model, clip_prompt=self.clip_prompt)

    # ---- groups, DM direction, advantages --------------------------------------------------------
    @torch.no_grad()
    def _dm(self, triad, x: torch.Tensor, c):
        """Per-sample DM direction with the group normaliser, and the DM reward r (None for advantage none)."""
        sched, n, G = triad.teacher.schedule, len(x), self.group_size
        t = sched.sample_t(n // G if self.shared_t else n, self.t_min, self.t_max, device=x.device)
        t = t.repeat_interleave(G) if self.shared_t else t
        x_t = sched.add_noise(x, torch.randn_like(x), t)
        x0_real = triad.teacher.guided(x_t, t, c, self.real_guidance_scale)
        x0_fake = triad.fake_score(x_t, t, c)
        per = (x - x0_real).abs().mean(dim=tuple(range(1, x.ndim)))  # DMD's per-sample normaliser
        grad = dm_gradient(x, x0_real, x0_fake, group_mean(per, G) if self.normaliser == "group" else per,
                           self.norm_eps)
        space, r = self.loss_space(sched), None
        if self.advantage == "elbo":
            r = 0.5 * (weighted_dsm(sched, t, x0_fake, x, space) - weighted_dsm(sched, t, x0_real, x, space))
        return grad, (-grad.flatten(1).norm(dim=1) if self.advantage == "dm_norm" else r), per

    def _advantage(self, r_dm, scores, n: int, device, logs: dict | None = None) -> tuple[torch.Tensor, dict]:
        """A (B,): the DM reward and each external reward standardised in groups, summed, standardised; logs (+)."""
        G, eps, total, logs = self.group_size, self.advantage_eps, torch.zeros(n, device=device), logs or {}
        if r_dm is not None:
            total, logs["reward_dm_mean"] = total + group_standardise(r_dm, G, eps), r_dm.mean().detach()
        total = total + self._reward_set.advantage(scores, G, eps)
        return group_standardise(total, G, eps), logs

    # ---- importance sampling (few-step students) -------------------------------------------------
    @torch.no_grad()
    def _rollout(self, triad, z: torch.Tensor, c) -> dict:
        """The whole stochastic chain from z: inputs x_{t_i} and x0 outputs (K, B, ...), and the group advantages."""
        gen, xs, x0s = triad.raw("generator"), [], []
        x0 = simulate(triad.generator, gen.schedule, gen.timesteps, z, c, gen.num_steps - 1, trace=(xs, x0s))
        r_dm = self._dm(triad, x0, c)[1] if self.advantage != "none" else None
        scores, logs = self._reward_set(x0, c, grad=False)
        adv, more = self._advantage(r_dm, scores, len(z), z.device)
        return {"xs": torch.stack(xs), "x0": torch.stack(x0s), "cond": c, "adv": adv, "uses": 0,
                "logs": {**logs, **more}}

    def _replay(self, triad, batch: dict):
        """Graded output of a rollout at a random step, its clipped ratio weight, the PPO term and logs."""
        gen = triad.raw("generator")
        sched, ts, K = gen.schedule, gen.timesteps, gen.num_steps
        if self._roll is None or self._roll["uses"] >= self.reuse:
            self._roll = self._rollout(triad, batch["z"], repeat_groups(batch.get("cond"), self.group_size))
        roll = self._roll
        roll["uses"] += 1  # (K, B, ...) inputs and outputs of each step; conditions; advantages
        xs, x0_old, c, adv, n = roll["xs"], roll["x0"], roll["cond"], roll["adv"], roll["xs"].shape[1]
        t_all = torch.cat([sched.timesteps_tensor(t, n, xs.device) for t in ts])
        c_all = None if c is None else c.repeat(K, *[1] * (c.ndim - 1))
        out = triad.generator(xs.flatten(0, 1), t_all, c_all).view_as(xs)  # one graded forward over every step
        log_ratio = renoise_log_ratios(sched, ts, xs, out, x0_old)  # (K - 1, B)
        k, lo, hi = int(torch.randint(0, K, ()).item()), 1 - self.clip_range, 1 + self.clip_range
        iw = log_ratio[:k].sum(0).detach().exp().clamp(lo, hi)
        rho = log_ratio.sum(0).exp()
        loss_pg = -torch.min(rho * adv, rho.clamp(lo, hi) * adv).mean() / xs[0, 0].numel()
        logs = {**roll["logs"], "is_ratio_mean": rho.detach().mean(), "rollout_use": roll["uses"],
                "is_clip_frac": ((rho.detach() < lo) | (rho.detach() > hi)).float().mean().detach()}
        return out[k], c, adv, iw, loss_pg, logs

    # ---- generator turn --------------------------------------------------------------------------
    def generator_loss(self, triad, batch: dict) -> tuple[torch.Tensor, dict]:
        n, G = batch["z"].shape[0], self.group_size
        if n % G:
            raise OnestepError(f"group_size: {G} does not divide the {n} samples per process; pick a divisor of "
                               "--batch_size")
        iw = loss_pg = None
        grad_rewards = self.reward_gradient_weight > 0 and bool(self.rewards)
        if triad.raw("generator").num_steps > 1 and (self.reuse > 1 or self.pg_weight > 0):
            x, c, adv, iw, loss_pg, logs = self._replay(triad, batch)
            scores = self._reward_set(x, c, grad=True)[0] if grad_rewards else {}
        else:
            c = repeat_groups(batch.get("cond"), self.group_size)
            x = triad.generate(batch["z"], c)
        batch["generated"], batch["cond"] = x.detach(), c  # the critic turn trains on these (as DMD)
        grad, r_dm, per = self._dm(triad, x.detach(), c)
        if iw is None:
            scores, logs = self._reward_set(x, c, grad=grad_rewards)
            adv, logs = self._advantage(r_dm, scores, n, x.device, logs)
        weight = torch.exp(self.advantage_scale * adv)
        weight = weight / group_mean(weight, G) * (1.0 if iw is None else iw)
        loss = loss_dm = dm_surrogate(x, grad * append_dims(weight, grad.ndim))
        logs.update({"loss_dm": loss_dm.detach(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean().detach(),
                     "dm_normaliser": per.mean().detach(), "adv_abs_mean": adv.abs().mean().detach(),
                     "adv_group_std": adv.view(-1, G).std(1, unbiased=False).mean().detach(),
                     "adv_weight_max": weight.max().detach(), "adv_weight_min": weight.min().detach()})
        if loss_pg is not None and self.pg_weight > 0:
            loss, logs["loss_pg"] = loss + self.pg_weight * loss_pg, loss_pg.detach()
        term = self._reward_set.gradient_term(scores)  # None unless a reward is differentiable here
        if term is not None:
            loss, logs["loss_reward"] = loss + self.reward_gradient_weight * term, term.detach()
        if self.gan_generator_weight > 0 and batch.get("step", 0) >= self.gan_start:  # DMD2's GAN term, as in DMD
            loss_gan = self.gan_generator_term(triad, x, c)
            loss, logs["loss_gan_g"] = loss + self.gan_generator_weight * loss_gan, loss_gan.detach()
        return loss, logs

    # ---- checkpointing and evaluation --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Exact resume: each reward's running variance and the rollout still being reused."""
        return flatten_state({"reward_var": self._reward_set.var, "rollout": self._roll})

    def load_state_dict(self, state: dict) -> None:
        tree = unflatten_state(state)
        self._reward_set.var = {k: float(v) for k, v in tree.get("reward_var", {}).items()}
        roll = {k: v.to(self._device) if torch.is_tensor(v) else v for k, v in tree.get("rollout", {}).items()}
        self._roll = {"cond": None, "logs": {}, **roll, "uses": int(roll["uses"])} if roll else None

    def extra_metrics(self, sample, classifier=None, num_samples: int = 2000, sample_shape=(), device="cpu") -> dict:
        """metrics.json["gndm"]: its own options, and with the digits classifier the mean p(c | x) of class c's samples."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in DMD.__dataclass_fields__}
        if classifier is not None and self._labels:
            f = forget_class_figures(sample, classifier, self._labels, num_samples, sample_shape, device=device)
            out.update(class_confidence=f["forget_class_probability"], class_accuracy=f["forget_class_accuracy"])
        return {"gndm": out}

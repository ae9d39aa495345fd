"""The student: a denoiser evaluated at fixed timesteps on noise.

One step: x = D(prior(z), t_init, c). Few steps (DMD2's multi-step students): predict x0 at t_0,
re-noise it to t_1 with fresh noise, predict again, ... Training grades one call at a random
step k after running the first k steps without gradient (backward simulation).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .denoiser import Cond, Denoiser


class Generator(nn.Module):
    """A one- or few-step generator; forward(x_t, t, cond) is one denoiser call.

    `clip_sample` (diffusers' clip_sample_range): each call's x0 is clamped to [-clip_sample, clip_sample] with the
    gradient passed straight through, so a pixel past the data's range costs nothing where the data sits at the
    bound (a digit's background) and still gets the gradient of its clamped value; None: no clamp.
    """

    def __init__(self, denoiser: Denoiser, timesteps: Sequence[float] | None = None, clip_sample: float | None = None):
        super().__init__()
        self.denoiser = denoiser
        sched = denoiser.schedule
        self.timesteps = [sched.t_max] if not timesteps else list(timesteps)
        if clip_sample is not None and not clip_sample > 0:
            raise ValueError(f"clip_sample must be positive (or None for no clamp), got {clip_sample}")
        self.clip_sample = clip_sample

    @property
    def schedule(self):
        return self.denoiser.schedule

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def forward(self, x_t: torch.Tensor, t, cond: Cond = None) -> torch.Tensor:
        x0 = self.denoiser(x_t, t, cond)
        if self.clip_sample is None:
            return x0
        return x0 + (x0.clamp(-self.clip_sample, self.clip_sample) - x0).detach()  # straight-through clamp

    def sample(self, z: torch.Tensor, cond: Cond = None, num_steps: int | None = None,
               noise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Run all (or the first num_steps) steps from noise z; `noise(x)` draws the re-noising noise (default:
        `noise_from(z)`, so a sample depends on its own z only, not on the batch around it)."""
        k = (num_steps or self.num_steps) - 1
        return simulate(self, self.schedule, self.timesteps, z, cond, k, noise or (noise_from(z) if k else None))


def noise_from(z: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Re-noising noise for a few-step chain, row by row from a generator seeded by a hash of that row of z: sample i
    gets the same chain whatever its batch, batch size, process or routing (evaluation seeds only z per sample)."""
    import hashlib

    rows = z.detach().float().flatten(1).cpu().numpy()
    gens = [torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little"))
            for r in rows]

    def draw(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device, x.dtype)
    return draw


def simulate(net: Callable, schedule, timesteps: Sequence, z: torch.Tensor, cond: Cond, k: int,
             noise: Callable[[torch.Tensor], torch.Tensor] | None = None, grad_last: bool = True,
             trace: tuple[list, list] | None = None) -> torch.Tensor:
    """Backward simulation: k no-grad steps from noise z, then the call at timesteps[k] (graded if grad_last).

    `net` is the generator module (or its distributed wrapper); noise(x) gives fresh noise like x; `trace`, two
    lists, receives every step's input x_t and output x0.
    """
    if not 0 <= k < len(timesteps):
        raise ValueError(f"step index {k} is outside the generator's {len(timesteps)} timesteps")
    noise = noise or torch.randn_like
    x_t = schedule.prior(z, timesteps[0])
    with torch.no_grad():
        for i in range(k):
            x0 = net(x_t, timesteps[i], cond)
            if trace is not None:
                trace[0].append(x_t), trace[1].append(x0)
            t_next = schedule.timesteps_tensor(timesteps[i + 1], z.shape[0], z.device)
            x_t = schedule.add_noise(x0, noise(x0), t_next)
    with torch.set_grad_enabled(grad_last and torch.is_grad_enabled()):
        x0 = net(x_t, timesteps[k], cond)
    if trace is not None:
        trace[0].append(x_t), trace[1].append(x0)
    return x0


def renoise_log_ratios(schedule, timesteps: Sequence, xs: torch.Tensor, x0_new: torch.Tensor,
                       x0_old: torch.Tensor) -> torch.Tensor:
    """(K - 1, B) log-likelihood ratios of a traced chain's re-noising steps x_{t_{i+1}} ~ N(alpha x0_i, sigma^2 I)
    under new x0 outputs against the old ones (xs, x0_*: (K, B, ...) as `simulate`'s trace stacks them)."""
    dims, out = tuple(range(1, xs.ndim - 1)), []
    for i in range(len(timesteps) - 1):
        a, s = schedule.alpha_sigma(schedule.timesteps_tensor(timesteps[i + 1], 1, xs.device))
        d_new, d_old = ((xs[i + 1] - a * x0).square().sum(dims) for x0 in (x0_new[i], x0_old[i]))
        out.append(-(d_new - d_old) / (2 * s**2))
    return torch.stack(out)

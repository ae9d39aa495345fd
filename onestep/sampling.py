"""Multi-step sampling of a teacher through diffusers schedulers, driven by the x0 contract."""
from __future__ import annotations

import torch

from .denoiser import Cond, Denoiser


@torch.no_grad()
def sample_teacher(teacher: Denoiser, z: torch.Tensor, cond: Cond = None, num_steps: int = 50,
                   guidance_scale: float = 1.0, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample with DDIM (trailing spacing; eta 0 = the deterministic ODE) from noise z; returns x0 in float32.

    The scheduler is told the model predicts x0 ("sample"), so any backbone works through the denoiser.
    VP schedules use DDIMScheduler; flow schedules FlowMatchEulerDiscreteScheduler.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    sched = teacher.schedule
    x = sched.prior(z.float(), sched.t_max)
    if sched.kind == "vp":
        s = DDIMScheduler(num_train_timesteps=sched.num_train_timesteps, trained_betas=_betas(sched),
                          prediction_type="sample", clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="trailing")
        s.set_timesteps(num_steps, device=z.device)
        for t in s.timesteps:
            x0 = teacher.guided(x, t, cond, guidance_scale)
            x = s.step(x0, t, x, eta=eta, generator=generator).prev_sample
        return x.float()
    if sched.kind == "flow":
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=sched.num_train_timesteps)
        s.set_timesteps(num_steps, device=z.device)
        for t in s.timesteps:
            tt = t / sched.num_train_timesteps
            x0 = teacher.guided(x, tt, cond, guidance_scale)
            x = s.step(sched.from_x0(x0, x, sched.timesteps_tensor(tt, x.shape[0], x.device), "flow"), t, x).prev_sample
        return x.float()
    raise NotImplementedError("multi-step sampling of EDM teachers is not supported yet; use a VP or flow teacher")


def _betas(sched) -> list[float]:
    ac = sched.alphas_cumprod
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    return (1 - ac / prev).tolist()

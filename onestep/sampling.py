"""Multi-step sampling of a teacher through diffusers schedulers, driven by the x0 contract."""
from __future__ import annotations

import inspect

import torch

from .denoiser import Cond, Denoiser


@torch.no_grad()
def sample_teacher(teacher: Denoiser, z: torch.Tensor, cond: Cond = None, num_steps: int = 50,
                   guidance_scale: float = 1.0, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample the teacher's probability-flow ODE from noise z in `num_steps` steps; returns x0 in float32.

    Driven by x0 through the denoiser, so any backbone works. VP schedules: DDIMScheduler (trailing spacing; eta 0 =
    the deterministic ODE). Flow: FlowMatchEulerDiscreteScheduler with the teacher's scheduler settings (shift). EDM:
    EDMEulerScheduler on the teacher's sigma grid (Karras or exponential).
    """
    from diffusers import DDIMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

    sched = teacher.schedule
    x = sched.prior(z.float(), sched.t_max)
    if sched.kind == "vp":
        s = DDIMScheduler(num_train_timesteps=sched.num_train_timesteps, trained_betas=vp_betas(sched),
                          prediction_type="sample", clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="trailing")
        s.set_timesteps(num_steps, device=z.device)
        for t in s.timesteps:
            x0 = teacher.guided(x, t, cond, guidance_scale)
            x = s.step(x0, t, x, eta=eta, generator=generator).prev_sample
        return x.float()
    if sched.kind == "flow":
        # the teacher's own scheduler settings (its shift); dynamic shifting needs a transformer's image-sequence
        # length, so its static shift stands in for it
        s = FlowMatchEulerDiscreteScheduler.from_config(sched.sampler_config or {}, use_dynamic_shifting=False,
                                                        num_train_timesteps=sched.num_train_timesteps)
        s.set_timesteps(num_steps, device=z.device)
        for t in s.timesteps:
            tt = t / sched.num_train_timesteps
            x0 = teacher.guided(x, tt, cond, guidance_scale)
            x = s.step(sched.from_x0(x0, x, sched.timesteps_tensor(tt, x.shape[0], x.device), "flow"), t, x).prev_sample
        return x.float()
    # EDM: Euler on the probability-flow ODE over the teacher's sigma grid (Karras or exponential, its sigmas, rho) with
    # EDMEulerScheduler. Its step takes x0 itself where it accepts pred_original_sample (newer diffusers); otherwise the
    # preconditioned output F = (x0 - c_skip x) / c_out, which it turns back into x0 (to float32 rounding of x)
    s = EDMEulerScheduler.from_config(sched.sampler_config or {}, sigma_min=sched.sigma_min, sigma_max=sched.sigma_max,
                                      sigma_data=sched.sigma_data, rho=sched.rho, prediction_type="epsilon")
    s.set_timesteps(num_steps, device=z.device)
    s.is_scale_input_called = True  # the denoiser applies EDM's c_in itself
    takes_x0 = "pred_original_sample" in inspect.signature(s.step).parameters
    for t, sigma in zip(s.timesteps, s.sigmas.tolist()):
        x0 = teacher.guided(x, torch.tensor(sigma, device=x.device), cond, guidance_scale).float()
        if takes_x0:
            x = s.step(x0, t, x, pred_original_sample=x0).prev_sample
        else:
            f = sched.from_x0(x0, x, sched.timesteps_tensor(sigma, x.shape[0], x.device), "edm")
            x = s.step(f, t, x).prev_sample
    return x.float()


def vp_betas(sched) -> list[float]:
    """The betas of a VP schedule, from its alphas_cumprod."""
    ac = sched.alphas_cumprod
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    return (1 - ac / prev).tolist()

"""DMD1's regression loss lambda_reg * d(G(z_ref), y_ref) on pairs (z_ref, y_ref) precomputed with the teacher's
deterministic ODE sampler from the same noise. The distance d (METHODS.md §1: LPIPS in the paper; MSE, or a feature
distance where LPIPS weights are unavailable):

    mse      the mean squared error in the sample space (pixels, or latents for SD-family teachers)
    teacher  the mean squared error of the teacher's own features (its `feature_layers`, the UNet mid-block by
             default) on both images noised to the same time with the same noise: a feature distance that needs
             no download and works in any teacher's sample space, latents included. The gradient reaches G(z_ref)
             through the frozen teacher with respect to its input; the target's features carry none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import sample_teacher

DISTANCES = ("mse", "teacher")


def regression_pairs(triad, cond_sampler, sample_shape, device, seed: int, n: int, steps: int, guidance_scale: float):
    """n pairs (z, c, y = teacher ODE(z, c)): DDIM with `steps` steps, drawn with a fixed seed (identical on every
    process); kept on the CPU."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *sample_shape, generator=g)
    c = cond_sampler(n, generator=g)
    ys = []
    for i in range(0, n, 256):
        ci = None if c is None else c[i:i + 256].to(device)
        ys.append(sample_teacher(triad.raw("teacher"), z[i:i + 256].to(device), ci, steps, guidance_scale).cpu())
    return z, c, torch.cat(ys)


def regression_distance(kind: str, triad, x: torch.Tensor, y: torch.Tensor, cond=None,
                        t_frac: float = 0.0) -> torch.Tensor:
    """d(x, y) for generated samples x (with gradient) and teacher ODE targets y; `t_frac`: the noise level of the
    teacher's feature distance as a fraction of its schedule's range."""
    if kind == "mse":
        return F.mse_loss(x.float(), y.float())
    if kind != "teacher":
        raise ValueError(f"regression_distance must be one of {', '.join(DISTANCES)}, got {kind!r}")
    teacher = triad.raw("teacher")  # the teacher itself, also while DisBack makes an intermediate node the DM target
    sched = teacher.schedule
    t = sched.sample_t(x.shape[0], t_frac, t_frac, device=x.device)  # one time: the fraction t_frac
    noise = torch.randn_like(x, dtype=torch.float32)
    with torch.no_grad():
        target = teacher(sched.add_noise(y.float(), noise, t), t, cond, features_only=True)
    feats = teacher(sched.add_noise(x.float(), noise, t), t, cond, features_only=True)
    return sum(F.mse_loss(f, g) for f, g in zip(feats, target)) / len(feats)

"""DMD2's GAN discriminator head on a score network's bottleneck (UNet mid-block) features."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class GANHead(nn.Module):
    """Conv 4x4 stride 2 / GroupNorm / SiLU blocks down to 1x1, then a 1x1 conv to one logit per sample."""

    def __init__(self, in_channels: int, spatial: int, hidden: int | None = None, groups: int = 32):
        super().__init__()
        hidden = hidden or in_channels
        g = next(d for d in range(min(groups, hidden), 0, -1) if hidden % d == 0)
        layers: list[nn.Module] = []
        ch, size = in_channels, spatial
        while size > 1:
            layers += [nn.Conv2d(ch, hidden, 4, 2, 1), nn.GroupNorm(g, hidden), nn.SiLU()]
            ch, size = hidden, size // 2
        layers.append(nn.Conv2d(ch, 1, 1))
        self.net = nn.Sequential(*layers)
        self.in_channels, self.spatial = in_channels, spatial

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B,) logits."""
        return self.net(features.float()).flatten(1).mean(1)

    @classmethod
    def for_denoiser(cls, denoiser, sample_shape: Sequence[int], example_cond=None, hidden: int | None = None):
        """Size a head to the mid-block features of `denoiser` on inputs of `sample_shape` (C, H, W)."""
        if not sample_shape:
            raise ValueError("a GAN head needs the sample shape (C, H, W) to size itself")
        x = torch.zeros(1, *sample_shape, device=next(denoiser.parameters()).device)
        cond = None if example_cond is None else example_cond[:1]
        with torch.no_grad():
            _, feats = denoiser(x, denoiser.schedule.t_max, cond, features=True)
        return cls(feats.shape[1], feats.shape[-1], hidden)

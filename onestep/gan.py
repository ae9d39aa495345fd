"""DMD2's GAN discriminator head on a score network's features (UNet mid-block by default; several layers allowed)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _branch(in_channels: int, spatial: int, hidden: int, groups: int = 32, min_group: int = 16) -> nn.Sequential:
    """Conv 4x4 stride 2 / GroupNorm / SiLU blocks down to 1x1, then a 1x1 conv to one logit map.

    GroupNorm uses up to `groups` groups (DMD2's 32) but keeps >= `min_group` channels in each: on a 1x1 map a
    group of 2 channels normalises to about +-1 whatever its input (only a sign survives); with 64-channel digits
    features that head stayed at chance (loss 2 ln 2) in every digits run.
    """
    g = next(d for d in range(max(1, min(groups, hidden // min_group)), 0, -1) if hidden % d == 0)
    layers: list[nn.Module] = []
    ch, size = in_channels, spatial
    while size > 1:
        layers += [nn.Conv2d(ch, hidden, 4, 2, 1), nn.GroupNorm(g, hidden), nn.SiLU()]
        ch, size = hidden, size // 2
    layers.append(nn.Conv2d(ch, 1, 1))
    return nn.Sequential(*layers)


class GANHead(nn.Module):
    """One conv branch per feature map (DMD2: the mid-block alone); a sample's logit is the sum over branches."""

    def __init__(self, shapes: Sequence[tuple[int, int]], hidden: int | None = None):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]  # (channels, spatial size) of each feature map
        self.branches = nn.ModuleList(_branch(c, s, hidden or c) for c, s in self.shapes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """A list of (B, C_i, h_i, w_i) feature maps -> (B,) logits."""
        return sum(b(f.float()).flatten(1).mean(1) for b, f in zip(self.branches, features))

    @classmethod
    def for_denoiser(cls, denoiser, sample_shape: Sequence[int], example_cond=None, hidden: int | None = None):
        """Size a head to the `feature_layers` outputs of `denoiser` on inputs of `sample_shape` (C, H, W)."""
        if not sample_shape:
            raise ValueError("a GAN head needs the sample shape (C, H, W) to size itself")
        x = torch.zeros(1, *sample_shape, device=next(denoiser.parameters()).device)
        cond = None if example_cond is None else example_cond[:1]
        with torch.no_grad():
            feats = denoiser(x, denoiser.schedule.t_max, cond, features_only=True)
        return cls([(f.shape[1], f.shape[-1]) for f in feats], hidden)

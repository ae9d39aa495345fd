"""FID basics: streaming float64 feature moments, the shipped digits feature network, digits-FID.

FID itself is clean-fid's `frechet_distance` on the moments; the digits network's penultimate
features play Inception's role for 8x8 digits.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class DigitsClassifier(ModelMixin, ConfigMixin):
    """A small CNN for 8x8 digits in [-1, 1]; `features` (penultimate layer) defines digits-FID."""

    @register_to_config
    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(2 * w * 4, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) in [-1, 1] -> (B, feature_dim)."""
        return self.body(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 256 levels an 8-bit PNG would store, back in [-1, 1]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class FeatureStats:
    """Running float64 sums for the mean and covariance of feature vectors."""

    def __init__(self, dim: int):
        self.n, self.s1, self.s2 = 0, np.zeros(dim), np.zeros((dim, dim))

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().double().cpu().numpy()
        self.n += len(f)
        self.s1 += f.sum(0)
        self.s2 += f.T @ f

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased covariance), as numpy's np.cov(rowvar=False) would give."""
        mu = self.s1 / self.n
        cov = (self.s2 - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def frechet_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """FID between two (mean, covariance) pairs, by clean-fid's formula."""
    from cleanfid.fid import frechet_distance as fd

    return float(fd(a[0], a[1], b[0], b[1]))


@torch.no_grad()
def image_moments(images: Iterable[torch.Tensor], extractor: Callable[[torch.Tensor], torch.Tensor]):
    """Moments of extractor features over batches of images in [-1, 1] (quantised to 8 bits first)."""
    stats = None
    for x in images:
        f = extractor(quantize(x))
        stats = stats or FeatureStats(f.shape[1])
        stats.update(f)
    return stats.moments()


@torch.no_grad()
def evaluate_samples(sample: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], classifier: DigitsClassifier,
                     reference: tuple[np.ndarray, np.ndarray], num_samples: int, sample_shape, num_classes: int | None,
                     batch_size: int = 250, seed: int = 0, device="cpu") -> dict:
    """Digits-FID and class accuracy of `sample(z, labels)`; sample i uses noise from seed + i and label i % K."""
    stats, correct = FeatureStats(classifier.config.feature_dim), 0
    for start in range(0, num_samples, batch_size):
        idx = range(start, min(start + batch_size, num_samples))
        z = torch.stack([torch.randn(*sample_shape, generator=torch.Generator().manual_seed(seed + i)) for i in idx])
        labels = torch.tensor([i % num_classes for i in idx]) if num_classes else None
        x = quantize(sample(z.to(device), None if labels is None else labels.to(device)))
        f = classifier.features(x)
        stats.update(f)
        if labels is not None:
            correct += (classifier.head(f).argmax(1).cpu() == labels).sum().item()
    out = {"fid": frechet_distance(stats.moments(), reference), "num_samples": num_samples}
    if num_classes:
        out["class_accuracy"] = correct / num_samples
    return out

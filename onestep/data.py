"""Data the methods need: class labels, real images (the shipped digits set), prompts later."""
from __future__ import annotations

import numpy as np
import torch

DIGITS_CLASSES = 10
DIGITS_SPLIT_SEED = 0  # the fixed held-out split: 20% of each class, never trained on


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 real 8x8 digits as (N, 1, 8, 8) float32 in [-1, 1] and (N,) labels.

    split: "train" (80%), "test" (the fixed held-out 20%) or "all".
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    d = _load()
    x = d.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # 17 grey levels 0..16 -> [-1, 1]
    y = d.target.astype(np.int64)
    if split != "all":
        idx = np.arange(len(y))
        tr, te = train_test_split(idx, test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=y)
        keep = np.sort(tr if split == "train" else te)
        x, y = x[keep], y[keep]
    return torch.from_numpy(x)[:, None], torch.from_numpy(y)


class ConditionSampler:
    """Draws generator conditions: class labels uniformly, with a per-call torch.Generator."""

    def __init__(self, num_classes: int | None):
        self.num_classes = num_classes

    def __call__(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        return torch.randint(0, self.num_classes, (n,), generator=generator)

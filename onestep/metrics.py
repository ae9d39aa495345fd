"""Metrics beyond FID: KID (clean-fid's), precision / recall on k-NN manifolds, class accuracy and coverage."""
from __future__ import annotations

import numpy as np
import torch

from .errors import OnestepError


class MetricsError(OnestepError):
    """Too few features for a metric, with a message that says how to get more."""


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> float:
    """KID by clean-fid's `kernel_distance` (float32 features, as clean-fid gives it), subsets drawn from `seed`."""
    from cleanfid.fid import kernel_distance

    if len(real) < 2:
        raise MetricsError(f"KID: the reference has {len(real)} feature row(s); it needs at least 2 (use a reference "
                           "of more images, or --keep 0 for FID only)")
    if min(len(real), len(fake)) < 2:
        raise MetricsError(f"KID: {len(real)} reference and {len(fake)} generated feature rows; it needs at least 2 of "
                           "each (keep more samples' features: --keep)")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return kernel_distance(np.asarray(real, np.float32), np.asarray(fake, np.float32), num_subsets, max_subset_size)
    finally:
        np.random.set_state(state)


def knn_radii(x: torch.Tensor, k: int = 3, chunk: int = 1024, reference: bool = False) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (the radius of its k-NN ball); `reference`: x is the
    real data's features (for the message when there are too few)."""
    if len(x) <= k:
        whose, fix = (("the reference has ", f"use a reference of more than {k} images, or --keep 0 for FID only")
                      if reference else ("", f"keep more samples' features (--keep > {k})"))
        raise MetricsError(f"precision / recall: {whose}{len(x)} feature rows, but the k-NN radius needs more than "
                           f"k = {k}; {fix}")
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def coverage_of(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(c, centres) <= radii[None]).any(1) for c in points.split(chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of its
    k-NN balls; precision = fake samples on the real manifold, recall = real samples on the fake one."""
    r, f = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    precision = coverage_of(f, r, knn_radii(r, k, chunk, reference=True), chunk)
    recall = coverage_of(r, f, knn_radii(f, k, chunk), chunk)
    return precision, recall


def class_metrics(predictions: np.ndarray, labels: np.ndarray | None, num_classes: int,
                  classes: list[int] | None = None) -> dict:
    """Class accuracy (overall and per class of `classes`, when labels are known) and class-coverage entropy.

    `classes`: the classes the generator was asked for (default: all `num_classes`). Coverage entropy: entropy of
    the histogram of predictions among them over log(len(classes)); 1.0 = every class equally often, lower = some
    missing or over-produced (mode collapse shows here first); predictions outside them count against the accuracy
    only; None for a single class.
    """
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    counts = np.bincount(predictions, minlength=num_classes)[classes]
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    out = {"coverage_entropy": float((p * np.log(1 / p)).sum() / np.log(len(classes))) if len(classes) > 1 else None}
    if labels is not None:
        hit = predictions == labels
        out["class_accuracy"] = float(hit.mean())
        out["per_class_accuracy"] = [float(hit[labels == c].mean()) if (labels == c).any() else None for c in classes]
    return out

"""Metrics beyond FID: KID (clean-fid's), precision / recall on k-NN manifolds, class accuracy and coverage."""
from __future__ import annotations

import numpy as np
import torch


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> float:
    """KID by clean-fid's `kernel_distance` (float32 features, as clean-fid gives it), subsets drawn from `seed`."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return kernel_distance(np.asarray(real, np.float32), np.asarray(fake, np.float32), num_subsets, max_subset_size)
    finally:
        np.random.set_state(state)


def knn_radii(x: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (the radius of its k-NN ball)."""
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def coverage_of(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(c, centres) <= radii[None]).any(1) for c in points.split(chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of its
    k-NN balls; precision = fake samples on the real manifold, recall = real samples on the fake one."""
    r, f = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    precision = coverage_of(f, r, knn_radii(r, k, chunk), chunk)
    recall = coverage_of(r, f, knn_radii(f, k, chunk), chunk)
    return precision, recall


def class_metrics(predictions: np.ndarray, labels: np.ndarray | None, num_classes: int) -> dict:
    """Class accuracy (overall and per class, when labels are known) and class-coverage entropy.

    Coverage entropy: entropy of the predicted-class histogram over log(num_classes); 1.0 = every class
    equally often, lower = some classes missing or over-produced (mode collapse shows here first).
    """
    hist = np.bincount(predictions, minlength=num_classes)[:num_classes] / len(predictions)
    p = hist[hist > 0]
    out = {"coverage_entropy": float(-(p * np.log(p)).sum() / np.log(num_classes))}
    if labels is not None:
        hit = predictions == labels
        out["class_accuracy"] = float(hit.mean())
        out["per_class_accuracy"] = [float(hit[labels == c].mean()) if (labels == c).any() else None
                                     for c in range(num_classes)]
    return out

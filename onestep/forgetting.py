"""Forgetting figures of a class-conditional digits generator (Score Forgetting Distillation's metrics).

Unlearning accuracy UA = 1 - classifier accuracy on samples of the forgotten classes; the mean classifier
probability of the forgotten class on them; and digits-FID of the remaining classes against the real digits
of those classes. Sample i draws its noise from `streaming.sample_seed(seed, i)`, as every other onestep evaluation does.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Sample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def forget_class_figures(sample: Sample, classifier, forget: Sequence[int], num_samples: int, sample_shape,
                         batch_size: int = 250, seed: int = 0, device="cpu") -> dict:
    """Classifier accuracy and mean probability of the true (forgotten) class on samples of the forget classes
    (sample i has label forget[i % len(forget)]); unlearning accuracy = 1 - that accuracy."""
    from .fid import quantize
    from .streaming import GeneratorSource

    labels = torch.as_tensor(list(forget), dtype=torch.long)
    src = GeneratorSource(lambda z, i: sample(z, labels.to(z.device)[i]), num_samples, sample_shape, len(labels),
                          seed, device)  # the same per-sample seeds as every other onestep evaluation
    hits, probs = [], []
    for start in range(0, num_samples, batch_size):
        idx = torch.arange(start, min(start + batch_size, num_samples))
        y = labels[src.labels(idx)].to(device)
        p = classifier(quantize(src(idx))).float().softmax(-1)
        hits.append(p.argmax(-1) == y)
        probs.append(p.gather(1, y[:, None])[:, 0])
    acc = torch.cat(hits).double().mean().item()
    return {"forget_class_accuracy": acc, "unlearning_accuracy": 1.0 - acc,
            "forget_class_probability": torch.cat(probs).double().mean().item(), "forget_samples": num_samples}


@torch.no_grad()
def remaining_class_figures(sample: Sample, classifier, remaining: Sequence[int], num_samples: int, sample_shape,
                            seed: int = 0, device="cpu") -> dict:
    """Digits-FID of samples of the remaining classes (sample i: label remaining[i % R]) against all real digits
    of those classes, and their class accuracy."""
    from .data import load_digits
    from .features import digits_extractor
    from .fid import frechet_distance, image_moments
    from .streaming import GeneratorSource, stream_features

    rem = torch.as_tensor(list(remaining), dtype=torch.long)
    x, y = load_digits("all")
    reference = image_moments([x[torch.isin(y, rem)].to(device)], classifier.features)
    src = GeneratorSource(lambda z, i: sample(z, rem.to(z.device)[i]), num_samples, sample_shape, len(rem), seed, device)
    r = stream_features(src, digits_extractor(classifier, device))
    acc = float((r.predictions == rem.numpy()[r.labels]).mean())  # labels are indices into `remaining`
    return {"remaining_fid": frechet_distance(r.stats.moments(), reference), "remaining_class_accuracy": acc,
            "remaining_samples": num_samples}


def forgetting_metrics(sample: Sample, classifier, forget: Sequence[int], remaining: Sequence[int], num_samples: int,
                       sample_shape, seed: int = 0, device="cpu") -> dict:
    """All SFD figures of `sample(z, labels)`: forget-class accuracy / UA / probability and remaining-class FID."""
    return {"forget": list(forget), "remaining": list(remaining),
            **forget_class_figures(sample, classifier, forget, num_samples, sample_shape, seed=seed, device=device),
            **remaining_class_figures(sample, classifier, remaining, num_samples, sample_shape, seed=seed, device=device)}

"""The benchmark behind eval/benchmark.py: teachers at several step counts and exported students, each
streamed through one feature extractor against one reference -> rows, a Markdown table, JSON and a plot.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import OnestepError
from .features import Extractor, input_problem
from .fid import NULL_ROW_HINT, frechet_distance
from .metrics import class_metrics, kid, precision_recall
from .reference import Reference, cleanfid_reference, compute_reference, digits_reference
from .streaming import FolderSource, GeneratorSource, pipeline_source, stream_features


class BenchmarkError(OnestepError):
    """Bad benchmark input (step list, reference spec)."""


@dataclass
class Model:
    """One benchmark row to produce: a generator source and how many network evaluations a sample costs."""

    model: str      # "teacher", "student" or "images" (a folder of generated images)
    path: str
    steps: int | None
    nfe: int | None
    source: GeneratorSource | FolderSource


def parse_steps(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; anything else -> BenchmarkError."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise BenchmarkError(f"--steps must be a comma-separated list of positive integers like 1,2,4, got {text!r}")
    return steps


def teacher_models(path: str, steps: list[int], num_samples: int, guidance: float = 1.0, seed: int = 0,
                   device="cpu", prompts: list[str] | None = None) -> list[Model]:
    """A teacher (onestep.loading.load_teacher) sampled with DDIM at each step count; a text-to-image teacher on
    `prompts` (sample i: prompt i % P; onestep.prompt_sources)."""
    from .loading import TeacherError, is_text_teacher, load_teacher
    from .prompt_sources import text_teacher_source
    from .sampling import sample_teacher

    text = is_text_teacher(path)
    if text and not prompts:
        raise BenchmarkError(f"teacher {path!r} is text-to-image: pass --prompts FILE (one prompt per line; sample i "
                             "uses prompt i % P)")
    t = load_teacher(path, device=device, prompts=list(prompts)[:num_samples] if text else None)  # (those in use)
    if guidance != 1.0 and t.null_class is None and not text:
        raise TeacherError(f"--guidance {guidance}: teacher {path!r} has no null class for classifier-free guidance")
    check_teacher_steps(t, steps, path)
    models = []
    for n in steps:
        def sample(z, y, n=n):
            return sample_teacher(t.denoiser, z, y, n, guidance)
        src = text_teacher_source(t, n, guidance, num_samples, seed, device) if text else \
            GeneratorSource(sample, num_samples, t.sample_shape, t.num_classes, seed, device)
        models.append(Model("teacher", path, n, n * (1 if guidance == 1.0 else 2), src))
    return models


def check_teacher_steps(teacher, steps: list[int], path: str) -> None:
    """Refuse sampler step counts the teacher's schedule cannot be sampled with (before any sampling)."""
    sched = teacher.denoiser.schedule
    n = sched.num_train_timesteps
    if sched.kind == "vp" and max(steps) > n:
        raise BenchmarkError(f"--steps {max(steps)}: teacher {path!r} was trained on {n} timesteps, so DDIM takes at "
                             f"most {n} steps; pass step counts up to {n}")


def check_inputs(models: list[Model], extractor: Extractor, fix: str = "use --features inception") -> None:
    """Refuse models whose images the extractor cannot take (channels, size), before any sampling."""
    for m in models:
        if m.model == "images":
            first = os.path.relpath(m.source.files[0], m.path)
            if extractor.resize is None and (problem := input_problem(
                    extractor, m.source.first_image_shape(), f"--images {m.path!r}: its first image, {first}, is",
                    "resize the images to that size or pick other features")):
                raise BenchmarkError(problem)
            continue
        what = f"{'teacher' if m.model == 'teacher' else 'pipeline'} {m.path!r} makes"
        if problem := input_problem(extractor, m.source.image_shape, what, fix):
            raise BenchmarkError(problem)
        n = getattr(m.source, "num_classes", None)
        if extractor.num_classes and n and n > extractor.num_classes:
            raise BenchmarkError(f"{what.removesuffix(' makes')} has {n} classes and the classifier of the features knows "
                                 f"{extractor.num_classes}: {NULL_ROW_HINT}")


def check_reference_size(reference: Reference, keep: int, k: int = 3) -> None:
    """Refuse a reference with too few kept features for KID and precision / recall (k-NN), before any sampling."""
    n = None if reference.features is None else len(reference.features)
    if keep and n is not None and n <= k:
        raise BenchmarkError(f"the reference has {n} image(s) with features, but KID and precision / recall (k = {k} "
                             f"nearest neighbours) need more than {k}; use a larger reference, or --keep 0 for FID "
                             "only")


def images_model(path: str, extractor: Extractor) -> Model:
    """A folder of generated images (e.g. a text-to-image student's, saved from its stock pipeline), scored as they
    are: all of them, read as the extractor takes them; no NFE or sampling time."""
    return Model("images", path, None, None, FolderSource(path, extractor.channels, extractor.resize))


def pipeline_model(path: str, num_samples: int, seed: int = 0, device="cpu", prompts: list[str] | None = None) -> Model:
    """An exported student folder (OneStepPipeline, multi-student, or text-to-image on `prompts`): all of its steps."""
    src = pipeline_source(path, num_samples, seed, device, prompts)
    return Model("student", path, src.steps, src.steps * getattr(src, "nfe_per_step", 1), src)


def load_reference(spec: str, extractor: Extractor, batch_size: int = 250, keep: int = 10_000,
                   accelerator=None) -> Reference:
    """digits[:all|train|test], a statistics .npz, an image folder, or cleanfid:NAME:RES[:SPLIT]."""
    if spec == "digits" or spec.startswith("digits:"):
        split = spec.partition(":")[2] or "all"
        if split not in ("all", "train", "test"):
            raise BenchmarkError(f"--reference {spec!r}: the digits split is all, train or test")
        return digits_reference(extractor, split, batch_size=batch_size, keep=keep, accelerator=accelerator)
    if spec.startswith("cleanfid:"):
        parts = spec.split(":")[1:]
        if len(parts) not in (2, 3):
            raise BenchmarkError(f"--reference {spec!r}: expected cleanfid:NAME:RES[:SPLIT], e.g. cleanfid:cifar10:32:train")
        if extractor.name != "inception_v3":
            raise BenchmarkError(f"--reference {spec!r}: clean-fid's statistics are Inception-v3 features, not "
                                 f"{extractor.name!r} ones; use --features inception")
        ref = cleanfid_reference(parts[0], parts[1], extractor.mode, parts[2] if len(parts) == 3 else "train")
        ref.check(extractor, spec)
        return ref
    if spec.endswith(".npz"):
        return Reference.load(spec, extractor)
    if os.path.isfile(spec):
        raise BenchmarkError(f"--reference {spec!r} is a file but not statistics (.npz); pass an image folder, a .npz "
                             "from an earlier --out, digits, or cleanfid:NAME:RES[:SPLIT]")
    source = FolderSource(spec, extractor.channels, extractor.resize)
    first = f"its first image, {os.path.relpath(source.files[0], spec)}, is"
    if extractor.resize is None and (problem := input_problem(extractor, source.first_image_shape(), first,
                                                              "resize the images to that size or pick other features")):
        raise BenchmarkError(f"--reference {spec!r}: {problem}")
    return compute_reference(source, extractor, f"folder:{os.path.abspath(spec)}", batch_size, keep, accelerator)


def evaluate_model(m: Model, extractor: Extractor, reference: Reference, batch_size: int = 250, keep: int = 0,
                   k: int = 3, accelerator=None) -> dict:
    """One row: FID, and with `keep` > 0 KID and precision / recall on the first `keep` samples; class metrics
    when the extractor classifies; sampling seconds per image (after a warm-up call)."""
    m.source(torch.arange(min(2, len(m.source))))  # warm-up: lazy initialisation is not sampling time
    t0 = time.perf_counter()
    r = stream_features(m.source, extractor, batch_size, keep, accelerator)
    n = r.stats.n
    row = {"model": m.model, "path": m.path, "steps": m.steps, "nfe": m.nfe, "num_samples": n,
           "fid": frechet_distance(r.stats.moments(), reference.moments, device=extractor.device)}
    if keep and reference.features is not None:
        row["kid"] = kid(reference.features, r.features)
        row["precision"], row["recall"] = precision_recall(reference.features, r.features, k)
    if r.predictions is not None:
        row.update(class_metrics(r.predictions, r.labels, extractor.num_classes))
    row["seconds_per_image"] = None if m.model == "images" else r.sample_seconds / n  # reading files is not sampling
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def model_label(path: str) -> str:
    """A short name for a model folder: its name, or its run's name for run/pipeline."""
    parts = os.path.normpath(path).split(os.sep)
    return parts[-2] if parts[-1].startswith("pipeline") and len(parts) > 1 else parts[-1]


COLUMNS = [("model", "model"), ("steps", "steps"), ("nfe", "NFE"), ("fid", "FID"), ("kid", "KID"),
           ("precision", "precision"), ("recall", "recall"), ("class_accuracy", "class accuracy"),
           ("coverage_entropy", "coverage entropy"), ("seconds_per_image", "s / image")]


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (— where a metric does not apply)."""
    def cell(row, key):
        v = row.get(key)
        if v is None:
            return "—"
        if key == "model":
            return f"{v} ({model_label(row['path'])})"
        if key == "seconds_per_image":
            return f"{v:.2e}"
        if isinstance(v, float):  # rounding error of a zero (-1e-7) prints as 0, not -0
            places = 5 if key == "kid" else 3
            return f"{round(v, places) + 0.0:.{places}f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, k) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def plot_benchmark(rows: list[dict], path: str) -> None:
    """FID against NFE and against sampling seconds per image, one line per model folder (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("nfe", "network evaluations (NFE)"), ("seconds_per_image", "sampling seconds per image")):
        ax = axes[0 if key == "nfe" else 1]
        for name in dict.fromkeys((r["model"], r["path"]) for r in rows if r[key] is not None):  # not image folders
            pts = sorted((r[key], r["fid"]) for r in rows if (r["model"], r["path"]) == name)
            ax.plot(*np.array(pts).T, marker="o" if name[0] == "teacher" else "*", markersize=6 if name[0] == "teacher"
                    else 14, label=f"{name[0]} ({model_label(name[1])})")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="FID")
        ax.grid(alpha=0.3, which="both")
    if axes[0].get_legend_handles_labels()[0]:  # (image folders alone have no NFE to plot)
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

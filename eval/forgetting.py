"""Forgetting figures (Score Forgetting Distillation's metrics) of an exported digits student or of the teacher.

    python eval/forgetting.py --pipeline runs/digits-sid-sid/pipeline --forget 3   # the digits-sid preset's run
    python eval/forgetting.py --teacher assets/digits-teacher --steps 100 --forget 3

Unlearning accuracy (1 - classifier accuracy on samples of the forget classes), the mean classifier probability
of the forget class, and digits-FID of the remaining classes against the real digits of those classes. The same
function fills metrics.json["forgetting"] of an SFD run, so a plain student can be compared with it.
"""
from __future__ import annotations

import json
import sys

import torch


def main(argv=None) -> None:
    from onestep.cli import Parser, asset_path, classifier_problem, eval_args_problem
    from onestep.forgetting import forgetting_metrics
    from onestep.errors import OnestepError
    from onestep.fid import DigitsClassifier

    p = Parser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", help="an exported OneStepPipeline folder (class-conditional digits), or a "
                                        "multi-student export of one (each class through its own student)")
    src.add_argument("--teacher", help="a class-conditional digits teacher folder")
    p.add_argument("--steps", type=int, default=None, help="teacher sampler steps (DDIM, trailing; default 100)")
    p.add_argument("--forget", required=True, help="forgotten classes, e.g. 3 or 3,5")
    p.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, default=2000,
                   help="samples of the forget classes and of the rest (default %(default)s)")
    p.add_argument("--classifier", default=asset_path("assets/digits-classifier"))
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)

    try:
        try:
            forget = [int(v) for v in a.forget.split(",") if v.strip()]
        except ValueError:
            forget = []
        if not forget:
            raise OnestepError(f"--forget: expected class labels like 3 or 3,5, got {a.forget!r}")
        problem = eval_args_problem(a.num_samples, json_path=a.json, folder=a.pipeline or a.teacher)
        if problem:
            raise OnestepError(problem)
        if a.pipeline and a.steps is not None:
            raise OnestepError("--steps sets the teacher's sampler; a pipeline runs its own steps")
        a.steps = 100 if a.steps is None else a.steps
        if a.steps < 1:
            raise OnestepError(f"--steps must be >= 1, got {a.steps}")
        if problem := classifier_problem(a.classifier):
            raise OnestepError(problem)
        if a.pipeline:
            from onestep.streaming import pipeline_source

            source = pipeline_source(a.pipeline, a.num_samples)  # one student, or a multi-student export (routed)
            num_classes, sample, shape = source.num_classes, source.sample, tuple(source.sample_shape)
        else:
            from onestep.benchmark import check_teacher_steps
            from onestep.loading import load_teacher
            from onestep.sampling import sample_teacher

            teacher = load_teacher(a.teacher)
            check_teacher_steps(teacher, [a.steps], a.teacher)
            num_classes, shape = teacher.num_classes, tuple(teacher.sample_shape)
            sample = lambda z, y: sample_teacher(teacher.denoiser, z, y, a.steps)  # noqa: E731
        if shape != (1, 8, 8):
            raise OnestepError(f"forgetting.py scores digits models (1x8x8 images, the digits classifier's); "
                               f"{a.pipeline or a.teacher!r} makes {shape}: pass a digits teacher or its export")
        if not num_classes or any(not 0 <= f < num_classes for f in forget):
            raise OnestepError(f"--forget: {forget} must be class labels of this class-conditional model "
                               f"(0..{(num_classes or 1) - 1})")
        if len(set(forget)) >= num_classes:
            raise OnestepError(f"--forget: {forget} leaves no class to remain; forget fewer classes")
        classifier = DigitsClassifier.load(a.classifier)
    except (OnestepError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    remaining = [c for c in range(num_classes) if c not in forget]
    with torch.no_grad():
        r = forgetting_metrics(sample, classifier, forget, remaining, a.num_samples, shape)
    r["model"] = a.pipeline or f"{a.teacher} ({a.steps} steps)"
    print("| model | forget | unlearning accuracy | forget-class probability | remaining-class FID | remaining-class accuracy |")
    print("|---|---|---|---|---|---|")
    print(f"| {r['model']} | {forget} | {r['unlearning_accuracy']:.4f} | {r['forget_class_probability']:.4f} | "
          f"{r['remaining_fid']:.4f} | {r['remaining_class_accuracy']:.4f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()

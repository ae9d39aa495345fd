"""Digits-FID and class accuracy of a teacher at several sampler step counts, or of an exported pipeline.

    python eval/digits_fid.py --teacher assets/digits-teacher --steps 1,2,4,10,25,50,100
    python eval/digits_fid.py --pipeline runs/digits-dmd2/pipeline

Features: the shipped digits classifier's penultimate layer; reference: all 1797 digits.
Prints a Markdown table and writes it as JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> None:
    from onestep.data import load_digits
    from onestep.fid import DigitsClassifier, evaluate_samples, image_moments
    from onestep.loading import TeacherError, load_teacher
    from onestep.sampling import sample_teacher

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="teacher folder or hub id")
    src.add_argument("--pipeline", help="an exported OneStepPipeline folder")
    p.add_argument("--steps", default="1,2,4,10,25,50,100", help="teacher sampler step counts (DDIM, trailing)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale of the teacher")
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--classifier", default="assets/digits-classifier")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()

    net = DigitsClassifier.from_pretrained(a.classifier).eval()
    ref = image_moments([load_digits("all")[0]], net.features)
    rows = []
    try:
        if a.teacher:
            teacher = load_teacher(a.teacher)
            for n in [int(s) for s in a.steps.split(",")]:
                t0 = time.time()
                r = evaluate_samples(lambda z, y: sample_teacher(teacher.denoiser, z, y, n, a.guidance), net, ref,
                                     a.num_samples, teacher.sample_shape, teacher.num_classes)
                rows.append({"model": "teacher", "nfe": n * (1 if a.guidance == 1 else 2), "steps": n, **r,
                             "seconds": round(time.time() - t0, 2)})
        else:
            from onestep.pipeline import OneStepPipeline

            pipe = OneStepPipeline.from_pretrained(a.pipeline)
            gen = pipe.student()
            t0 = time.time()
            r = evaluate_samples(lambda z, y: gen.sample(z, y), net, ref, a.num_samples, (1, 8, 8), pipe.config.num_classes)
            rows.append({"model": "student", "nfe": gen.num_steps, "steps": gen.num_steps, **r,
                         "seconds": round(time.time() - t0, 2)})
    except (TeacherError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("| model | sampler steps | NFE | digits-FID | class accuracy |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | {r.get('class_accuracy', float('nan')):.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

"""GNDM benchmark on the digits teacher: DMD2 (the `digits` preset at `digits-gndm`'s settings: batch 64, generator
lr 2e-4, no x0 clamp) vs GNDM (`digits-gndm`: those settings with groups) vs GNDMR (GNDM + the classifier reward), at
equal iterations over several seeds.

    python eval/gndm_benchmark.py --steps 400 --seeds 0,1,2 --eval_samples 1000 --out /tmp/gndm-bench

Each run is `python train/distill.py --preset P --seed S --steps N ... --cpu_threads 1` into OUT/VARIANT-sS
(skipped when its metrics.json exists, so an interrupted benchmark continues), at most --jobs at a time. Then
every exported student is scored: digits-FID (metrics.json), class accuracy, and class confidence (the mean
classifier probability of the requested class) over the same eval_samples samples (sample i: noise seed i,
class i mod 10). Writes OUT/gndm_benchmark.md (the table) and OUT/gndm_benchmark.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "dmd2": ["--preset", "digits", "--batch_size", "64", "--lr_generator", "2e-4", "--clip_sample", "0"],  # as digits-gndm
    "gndm": ["--preset", "digits-gndm"],
    "gndmr": ["--preset", "digits-gndm", "--rewards", "classifier"],  # + --reward_gradient_weight
}


def run_command(variant: str, seed: int, a) -> list[str]:
    """The training command of one run."""
    args = [*VARIANTS[variant], "--seed", str(seed), "--steps", str(a.steps), "--eval_samples", str(a.eval_samples),
            "--teacher_eval_steps", "1", "--sample_every", "0", "--checkpoint_every", "0", "--cpu_threads", "1",
            "--output_dir", a.out, "--name", f"{variant}-s{seed}", "--overwrite"]
    if variant == "gndmr":
        args += ["--reward_gradient_weight", str(a.reward_gradient_weight)]
    return [sys.executable, os.path.join(ROOT, "train", "distill.py"), *args, *a.extra]


def train_all(runs: list[tuple[str, int]], a) -> None:
    """Run the missing runs, at most a.jobs at a time; the first failure stops the others."""
    from onestep.launch import Job, run_jobs

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",  # the onestep beside this script
           "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
    run_jobs([Job(f"{v}-s{s}", run_command(v, s, a), os.path.join(a.out, f"{v}-s{s}.log"), env, ROOT) for v, s in runs
              if not os.path.exists(os.path.join(a.out, f"{v}-s{s}", "metrics.json"))], a.jobs)


def score(run_dir: str, num_samples: int, classifier) -> dict:
    """FID from the run's metrics.json; class accuracy and confidence of its exported student."""
    from onestep.forgetting import forget_class_figures
    from onestep.pipeline import OneStepPipeline

    m = json.load(open(os.path.join(run_dir, "metrics.json")))
    student = OneStepPipeline.from_pretrained(os.path.join(run_dir, "pipeline")).student().eval()
    f = forget_class_figures(student.sample, classifier, list(range(10)), num_samples, (1, 8, 8))
    return {"fid": m["student"]["fid"], "class_accuracy": f["forget_class_accuracy"],
            "class_confidence": f["forget_class_probability"], "train_seconds": m["train_seconds"]}


def table(results: dict, a) -> str:
    """Markdown: one row per variant, per-seed FIDs and mean +- std of each figure."""
    def ms(vals):
        return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"

    lines = [f"| variant | digits-FID per seed ({', '.join(map(str, a.seeds))}) | FID mean ± std | class confidence "
             "| class accuracy | training s (mean) |", "|---|---|---|---|---|---|"]
    for variant, rows in results.items():
        fids = [r["fid"] for r in rows]
        lines.append(f"| {variant} | {', '.join(f'{v:.3f}' for v in fids)} | {ms(fids)} | "
                     f"{ms([r['class_confidence'] for r in rows])} | {ms([r['class_accuracy'] for r in rows])} | "
                     f"{statistics.mean(r['train_seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


def main() -> None:
    from onestep.cli import Parser, first_error, output_problem

    p = Parser(description=__doc__)
    p.add_argument("--steps", type=int, default=400, help="training iterations of every run")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, e.g. 0,1,2")
    p.add_argument("--variants", default="dmd2,gndm,gndmr", help=f"a subset of {', '.join(VARIANTS)}")
    p.add_argument("--eval_samples", type=int, default=1000, help="samples for FID, accuracy and confidence")
    p.add_argument("--reward_gradient_weight", type=float, default=0.005, help="gndmr: weight of the reward gradient")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--out", default="runs/gndm-benchmark", help="run folders and the table")
    p.add_argument("--classifier", default=os.path.join(ROOT, "assets", "digits-classifier"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further distill.py options for every run; must come last (all that follows goes to the runs)")
    a = p.parse_args()
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: expected integers like 0,1,2, got {a.seeds!r}")
    variants = [v for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not a.seeds:
        p.error(f"--variants: {bad[0]!r} is not one of {', '.join(VARIANTS)}" if bad else "--seeds: give at least one")
    first_error(p, [len(set(a.seeds)) < len(a.seeds) and f"--seeds: {a.seeds} repeats a seed (the same run twice)",
                    min(a.steps, a.jobs) < 1 and "--steps and --jobs must be >= 1",
                    a.eval_samples < 2 and f"--eval_samples must be >= 2, got {a.eval_samples}",
                    not os.path.isdir(a.classifier) and f"--classifier {a.classifier!r} is not a folder",
                    lambda: output_problem("--out", a.out)])
    train_all([(v, s) for s in a.seeds for v in variants], a)  # seed by seed: partial results stay paired

    import torch

    from onestep.fid import DigitsClassifier

    torch.set_num_threads(1)
    clf = DigitsClassifier.load(a.classifier)
    results = {v: [score(os.path.join(a.out, f"{v}-s{s}"), a.eval_samples, clf) for s in a.seeds] for v in variants}
    md = table(results, a)
    print(md)
    with open(os.path.join(a.out, "gndm_benchmark.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(a.out, "gndm_benchmark.json"), "w") as f:
        json.dump({"steps": a.steps, "seeds": a.seeds, "eval_samples": a.eval_samples,
                   "reward_gradient_weight": a.reward_gradient_weight, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

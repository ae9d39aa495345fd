"""Multi-student distillation on the digits teacher: K = 1, 2, 5 same-size students and 5 smaller ones, one table.

    python eval/msd_benchmark.py --steps 600 --jobs 2 --out runs/msd-benchmark

Each row is one `train/distill.py --students K` run (the digits preset, DMD2) with `--steps` iterations *per student*
(fairness rule: every student gets the single student's iterations; K students cost K times the training, never more
per sample at inference: one forward of one student); the shared-fake-score rows train the K students jointly for
K x --steps iterations, each splitting the batch among them (the same samples per student). `--reference DIR` adds an exported single student trained for
as many iterations as the K = 5 students together (--reference_steps, 5 x --steps for a fair row; e.g. the default
run, runs/digits-dmd2/pipeline: 1200 = 5 x 240), scored the same way. Digits-FID over --eval_samples samples (default 10 000; sample i: noise seed i, class i mod 10). Writes
OUT/msd_benchmark.md and .json; CPU seconds are each run's own (os.wait4), so parallel jobs do not inflate them.
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {  # name: (label, K, further distill.py options)
    "k1": ("K = 1", 1, []),
    "k2": ("K = 2", 2, []),
    "k5": ("K = 5", 5, []),
    "k5-confusion": ("K = 5, confusion router", 5, ["--router", "confusion"]),
    "k5-small": ("K = 5, smaller students", 5, ["--student_channels", "{channels}", "--tsm_steps", "{tsm}"]),
    # one fake score for the K students, trained jointly: K x --steps iterations, each splitting the batch among the
    # students, so every student sees as many samples as one with its own fake score does
    "k5-shared": ("K = 5, one shared fake score", 5, ["--shared_fake_score", "--steps", "{joint}"]),
    "k5-small-shared": ("K = 5, smaller students, one shared fake score", 5,
                        ["--student_channels", "{channels}", "--tsm_steps", "{tsm}", "--shared_fake_score", "--steps",
                         "{joint}"]),
}


def job(name: str, args, out: str):
    """The training run of one row."""
    from onestep.launch import Job

    label, k, options = ROWS[name]
    extra = ["--students", str(k)] + [a.format(channels=args.student_channels, tsm=args.tsm_steps, joint=args.steps * k)
                                      for a in options]
    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), "--steps", str(args.steps), "--cpu_threads", "1",
           "--eval_samples", str(args.eval_samples), "--teacher_eval_steps", "1", "--sample_every", "0",
           "--checkpoint_every", "0", "--output_dir", out, "--name", name, "--overwrite", "--seed", str(args.seed), *extra]
    return Job(name, cmd, os.path.join(out, f"{name}.log"), {**os.environ, "OMP_NUM_THREADS": "1"}, ROOT)


def run_all(names: list[str], args, out: str) -> dict:
    """Run the rows, at most args.jobs at a time (the first failure stops the others); returns {name: CPU seconds}."""
    from onestep.launch import run_jobs

    return run_jobs([job(name, args, out) for name in names], args.jobs)


def seconds_per_image(sample, n: int = 1000, batch: int = 250) -> float:
    """Wall seconds per one-step sample at batch `batch`, one thread, after a warm-up batch."""
    import torch

    labels = torch.arange(n) % 10
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sample(z[:batch], labels[:batch])
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            sample(z[i:i + batch], labels[i:i + batch])
    return (time.perf_counter() - t0) / n


def sampler(folder: str):
    """The routed sampler of a multi-student export, or a single student's."""
    from onestep.multistudent import routed_sample
    from onestep.pipeline import OneStepPipeline
    from onestep.pipeline_multi import MultiStudentPipeline

    if os.path.isfile(os.path.join(folder, "multistudent.json")):
        pipe = MultiStudentPipeline.from_pretrained(folder)
        gens = pipe.students()
        return (lambda z, y: routed_sample([g.sample for g in gens], pipe.router, z, y)), len(gens), gens[0]
    gen = OneStepPipeline.from_pretrained(folder).student()
    return gen.sample, 1, gen


def score_reference(folder: str, eval_samples: int) -> dict:
    """Digits-FID and class accuracy of an exported single student, as the trainer scores its students."""
    from onestep.data import load_digits
    from onestep.fid import DigitsClassifier, evaluate_samples, image_moments

    clf = DigitsClassifier.from_pretrained(os.path.join(ROOT, "assets", "digits-classifier")).eval()
    ref = image_moments([load_digits("all")[0]], clf.features)
    sample, _, _ = sampler(folder)
    return evaluate_samples(sample, clf, ref, eval_samples, (1, 8, 8), 10)


def main() -> None:
    from onestep.cli import Parser, first_error, output_problem

    p = Parser(description=__doc__)
    p.add_argument("--rows", default="k1,k2,k5,k5-small", help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=240, help="training iterations per student")
    p.add_argument("--student_channels", default="32,32,32", help="block_out_channels of the smaller students")
    p.add_argument("--tsm_steps", type=int, default=400, help="Teacher Score Matching iterations per smaller student")
    p.add_argument("--eval_samples", type=int, default=10000,
                   help="samples per digits-FID (2000-sample figures scatter by +-0.05 for one model)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", default="", help="an exported single student to score alongside (e.g. the default run)")
    p.add_argument("--reference_steps", type=int, default=1200, help="its training iterations, for the table (a fair reference: 5 x --steps)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "msd-benchmark"),
                   help="run folders and the table (default: runs/msd-benchmark in the project folder)")
    p.add_argument("--skip_training", action="store_true", help="tabulate the runs already in --out")
    args = p.parse_args()
    names = [n for n in args.rows.split(",") if n]
    bad = [n for n in names if n not in ROWS]
    first_error(p, [bad and f"--rows: unknown row {bad[0]!r}; choose from {', '.join(ROWS)}",
                    not names and f"--rows: give at least one of {', '.join(ROWS)}",
                    min(args.steps, args.jobs) < 1 and "--steps and --jobs must be >= 1",
                    args.eval_samples < 2 and f"--eval_samples must be >= 2, got {args.eval_samples}",
                    lambda: output_problem("--out", args.out)])
    os.makedirs(args.out, exist_ok=True)
    cpu_file = os.path.join(args.out, "cpu_seconds.json")
    cpu = json.load(open(cpu_file)) if args.skip_training and os.path.isfile(cpu_file) else {}
    if not args.skip_training:
        order = sorted(names, key=lambda n: -ROWS[n][1])  # longest first
        cpu = run_all(order, args, args.out)
        with open(cpu_file, "w") as f:
            json.dump(cpu, f)

    import torch

    torch.set_num_threads(1)
    rows = []
    for name in names:
        m = json.load(open(os.path.join(args.out, name, "metrics.json")))
        sample, k, gen = sampler(os.path.join(args.out, name, "pipeline"))
        joint = bool(m.get("shared_fake_score"))  # one run of m["steps"] iterations, each batch split among the K
        rows.append({"row": ROWS[name][0], "students": k, "iterations_per_student": m["steps"] // k if joint else m["steps"],
                     "iterations_total": m["steps"] if joint else m["steps"] * k, "parameters_per_student": sum(p.numel() for p in gen.parameters()),
                     "nfe": 1, "fid": m["student"]["fid"], "class_accuracy": m["student"]["class_accuracy"],
                     "cpu_seconds": cpu.get(name), "seconds_per_image": seconds_per_image(sample)})
    if args.reference:
        r = score_reference(args.reference, args.eval_samples)
        sample, _, gen = sampler(args.reference)
        rows.append({"row": f"K = 1 ({args.reference})", "students": 1, "iterations_per_student": args.reference_steps,
                     "iterations_total": args.reference_steps, "parameters_per_student": sum(p.numel() for p in gen.parameters()),
                     "nfe": 1, "fid": r["fid"], "class_accuracy": r["class_accuracy"], "cpu_seconds": None,
                     "seconds_per_image": seconds_per_image(sample)})
    lines = ["| model | iterations per student (total) | parameters per student | NFE | digits-FID | class accuracy | "
             "run CPU s | s / image |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['iterations_per_student']} ({r['iterations_total']}) | "
                     f"{r['parameters_per_student']:,} | 1 | {r['fid']:.3f} | {r['class_accuracy']:.3f} | "
                     f"{r['cpu_seconds'] if r['cpu_seconds'] is not None else '—'} | {r['seconds_per_image']:.2e} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "msd_benchmark.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "msd_benchmark.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""DisBack convergence benchmark: digits-FID against generator updates, a base method with and without DisBack.

    python eval/disback_benchmark.py --seeds 0,1,2 --steps 450 --eval_every 45 --out runs/disback-benchmark \\
        --plot assets/disback-convergence.png

Runs `train/distill.py --preset digits` (DMD2; `--preset digits-sid` for SiD) for every seed, once
as it is and once with `--backtrack` (same seeds, iterations, evaluation), at most `--jobs` runs at a time and never
two DisBack runs at once (they share one recording: the first makes it, the others reuse it). Finished runs (a
metrics.json) are not run again. Writes `benchmark.md` (the table), `benchmark.json` and the plot into --out.
Options it does not know go to every run (e.g. --update_ratio 2); the x-axis counts generator updates, iterations
divided by the runs' update_ratio (the preset's, or the one passed).
"""
from __future__ import annotations

import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("base", "disback")


def run_command(arm: str, seed: int, a, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", os.path.join(ROOT, "train", "distill.py"),
           "--preset", a.preset, "--steps", str(a.steps), "--eval_every", str(a.eval_every), "--eval_samples",
           str(a.eval_samples), "--cpu_threads", str(a.cpu_threads), "--seed", str(seed), "--output_dir", a.out,
           "--name", f"{arm}-s{seed}", "--overwrite", "--export", "false", "--sample_every", "0", "--checkpoint_every", "0",
           "--teacher_eval_steps", "1", *extra]
    if arm == "disback":
        cmd += ["--backtrack", "--backtrack_nodes", str(a.nodes), "--backtrack_interval", str(a.interval),
                "--backtrack_switch", a.switch, "--record_interval", str(a.record_interval)]
    return cmd


def run_all(a, extra: list[str]) -> None:
    """Run the missing (arm, seed) runs, `jobs` at a time, at most one DisBack run at a time; the first failure
    stops the others."""
    from onestep.launch import Job, run_jobs

    env = {**os.environ, "OMP_NUM_THREADS": str(a.cpu_threads), "HF_HUB_OFFLINE": "1"}
    jobs = [Job(f"{arm}-s{s}", run_command(arm, s, a, extra), os.path.join(a.out, f"{arm}-s{s}.log"), env, ROOT)
            for s in a.seeds for arm in ARMS if not os.path.isfile(os.path.join(a.out, f"{arm}-s{s}", "metrics.json"))]
    cpu = run_jobs(jobs, a.jobs, may_start=lambda job, running: not (
        job.name.startswith("disback-") and any(r.startswith("disback-") for r in running)))
    with open(os.path.join(a.out, "cpu_seconds.json"), "w") as f:  # CPU time of the runs this call started
        json.dump({"cpu_seconds": round(sum(cpu.values()), 1), "jobs": a.jobs}, f)


def first_reaching(curve: list[dict], fid: float) -> int | None:
    return next((p["step"] for p in curve if p["fid"] <= fid), None)


def summarise(a) -> dict:
    """Curves per arm and seed, mean curves, and the iterations each arm needs to reach the stated FIDs."""
    runs = {arm: {} for arm in ARMS}
    for arm in ARMS:
        for s in a.seeds:
            path = os.path.join(a.out, f"{arm}-s{s}", "metrics.json")
            if not os.path.isfile(path):
                raise SystemExit(f"error: {path} does not exist: run the benchmark without --report_only to make it")
            with open(path) as f:
                runs[arm][s] = json.load(f)
    steps = [p["step"] for p in runs["base"][a.seeds[0]]["curve"]]
    mean = {arm: [sum(r["curve"][i]["fid"] for r in runs[arm].values()) / len(a.seeds) for i in range(len(steps))]
            for arm in ARMS}
    targets = [mean["base"][-1]] + [t for t in a.targets]
    reach = {arm: {f"{t:.3f}": {s: first_reaching(r["curve"], t) for s, r in runs[arm].items()} for t in targets}
             for arm in ARMS}
    first = runs["disback"][a.seeds[-1]]["disback"]
    return {"base": a.base_name, "steps": steps, "update_ratio": a.update_ratio, "seeds": a.seeds, "mean": mean, "targets": targets,
            "reach": reach, "curves": {arm: {s: [p["fid"] for p in r["curve"]] for s, r in runs[arm].items()} for arm in ARMS},
            "train_seconds": {arm: [r["train_seconds"] for r in runs[arm].values()] for arm in ARMS},
            "recording": {k: first.get(k) for k in ("recording_updates", "recording_seconds", "node_distances", "switches")}}


def table(r: dict) -> str:
    k, base = r["update_ratio"], r.get("base", "DMD2")
    seeds = ", ".join(str(s) for s in r["seeds"])
    lines = [f"digits-FID (mean over seeds {seeds}; min–max in brackets) after each evaluation:", "",
             f"| iterations | generator updates | {base} | {base} + DisBack |", "|---|---|---|---|"]
    for i, step in enumerate(r["steps"]):
        cells = []
        for arm in ARMS:
            vals = [c[i] for c in r["curves"][arm].values()]
            cells.append(f"{r['mean'][arm][i]:.3f} ({min(vals):.3f}–{max(vals):.3f})")
        lines.append(f"| {step} | {math.ceil(step / k)} | {cells[0]} | {cells[1]} |")
    lines += ["", "Iterations to reach a digits-FID (first evaluation at or below it; per seed, '—' = not reached):", "",
              f"| FID | {base} | {base} + DisBack |", "|---|---|---|"]
    for i, t in enumerate(r["targets"]):
        key = f"{t:.3f}"
        cells = [", ".join("—" if v is None else str(v) for v in r["reach"][arm][key].values()) for arm in ARMS]
        label = f"{key} ({base}'s final mean)" if i == 0 else key
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    rec = r["recording"]
    lines += ["", f"DisBack's recording: {rec['recording_updates']} fake-score updates on G0's samples "
              f"({rec['recording_seconds']} s, made once and reused by every seed); target switches (iteration, node): "
              f"{rec['switches']}; node distances from the teacher: {[round(d, 3) for d in rec['node_distances']]}.",
              f"Training seconds per run: {base} {r['train_seconds']['base']}, DisBack {r['train_seconds']['disback']}."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    x, base = [math.ceil(s / r["update_ratio"]) for s in r["steps"]], r.get("base", "DMD2")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for arm, label, color in (("base", base, "tab:blue"), ("disback", f"{base} + DisBack", "tab:orange")):
        curves = list(r["curves"][arm].values())
        ax.fill_between(x, [min(c[i] for c in curves) for i in range(len(x))],
                        [max(c[i] for c in curves) for i in range(len(x))], color=color, alpha=0.2)
        ax.plot(x, r["mean"][arm], marker="o", color=color, label=f"{label} (mean of {len(curves)} seeds; band: min–max)")
    ax.axhline(r["targets"][0], color="grey", ls="--", lw=1, label=f"{base}'s final mean FID {r['targets'][0]:.3f}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("generator updates")
    ax.set_ylabel("digits-FID")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    from onestep.cli import Parser, first_error, output_problem

    p = Parser(description=__doc__)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=450, help="iterations per run")
    p.add_argument("--eval_every", type=int, default=45)
    p.add_argument("--eval_samples", type=int, default=1000)
    p.add_argument("--preset", default="digits")
    p.add_argument("--base_name", default="", help="the base method's name in the table and plot (default: the "
                   "preset's method, e.g. DMD2, SiD)")
    p.add_argument("--nodes", type=int, default=4, help="the DisBack runs' --backtrack_nodes (default 4)")
    p.add_argument("--interval", type=int, default=15, help="their --backtrack_interval (default 15)")
    p.add_argument("--switch", default="fixed", help="their --backtrack_switch: fixed or plateau (default fixed)")
    p.add_argument("--record_interval", type=int, default=25, help="their --record_interval (default 25)")
    p.add_argument("--targets", default="2,1.5", help="more FIDs to report the iterations for")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--cpu_threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--out", default="runs/disback-benchmark")
    p.add_argument("--plot", default="", help="also write the plot here (e.g. assets/disback-convergence.png)")
    p.add_argument("--report_only", action="store_true", help="summarise finished runs, start none")
    a, extra = p.parse_known_args(argv)
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        a.targets = [float(t) for t in a.targets.split(",") if t.strip()]
    except ValueError:
        p.error(f"--seeds takes integers like 0,1,2 and --targets numbers like 2,1.5; got {a.seeds!r}, {a.targets!r}")
    from onestep.config import PRESETS, ConfigError, load_config, method_kwargs
    from onestep.methods import build_method

    try:  # the runs' configuration (checked before anything is written): its update_ratio scales the x-axis
        cfg = load_config(["--preset", a.preset, *([] if a.report_only else extra)])
        a.update_ratio = build_method(cfg.method, **method_kwargs(cfg)).update_ratio
    except (ConfigError, ValueError) as e:
        p.error(str(e))
    first_error(p, [not a.seeds and "--seeds: give at least one",
                    len(set(a.seeds)) < len(a.seeds) and f"--seeds: {a.seeds} repeats a seed (the same run twice)",
                    not all(0 < t < float("inf") for t in a.targets) and f"--targets must be FIDs > 0, got {a.targets}",
                    min(a.steps, a.jobs) < 1 and "--steps and --jobs must be >= 1",
                    a.eval_samples < 2 and f"--eval_samples must be >= 2, got {a.eval_samples}",
                    a.nodes < 2 and f"--nodes must be >= 2, got {a.nodes}",
                    a.switch not in ("fixed", "plateau") and f"--switch: {a.switch!r} is not one of fixed, plateau",
                    a.preset not in PRESETS and f"--preset: unknown preset {a.preset!r}; choose from {', '.join(PRESETS)}",
                    a.report_only and extra and f"{extra[0]}: unknown option (with --report_only no run is started)",
                    a.plot and output_problem("--plot", a.plot, "file"), lambda: output_problem("--out", a.out)])
    a.out = os.path.abspath(a.out)
    if not a.base_name:
        a.base_name = {"dmd": "DMD", "dmd2": "DMD2", "sid": "SiD", "vsd": "VSD"}.get(cfg.method, cfg.method)
    os.makedirs(a.out, exist_ok=True)
    if not a.report_only:
        run_all(a, extra)
    r = summarise(a)
    with open(os.path.join(a.out, "benchmark.json"), "w") as f:
        json.dump(r, f, indent=1)
    md = table(r)
    with open(os.path.join(a.out, "benchmark.md"), "w") as f:
        f.write(md)
    for path in [os.path.join(a.out, "benchmark.png")] + ([a.plot] if a.plot else []):
        plot(r, path)
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])

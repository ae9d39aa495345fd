"""Time one distillation iteration: img/s, TFLOP/s, fraction of the card's bf16 peak, peak memory, and the step
against the sum of its network passes timed alone -- every variant measured in the same run.

    python eval/step_benchmark.py                                  # CPU: digits, fp32, step vs passes
    python eval/step_benchmark.py --preset cifar --variants fp32,tf32,bf16,bf16-compile   # a GPU
    python eval/step_benchmark.py --preset sd15 --variants bf16 --fake-score copy,lora --gradient-checkpointing off,on

    python eval/step_benchmark.py --simulate-memory --preset sd15 --method dmd2 --fake-score lora \
        --gradient-checkpointing off,on --ema on,offload --optimizer adamw,adamw8bit   # no GPU needed

Prints a Markdown table and one JSON line per row; --out FILE also writes the rows as JSON.
--simulate-memory times nothing: it estimates each row's peak accelerator memory on this machine (fake tensors
with CUDA's autocast rules, onestep/memsim.py), at the GPU's default batch size; a lower bound of the GPU's
figure (no cuDNN / cuBLAS workspaces, no allocator rounding).
Figures are medians over --repeats iterations after --warmup (CUDA events on a GPU). The step is
onestep.methods.DMD's (--method dmd2: DMD2's, with its GAN head) generator and fake-score turns with the
trainer's per-turn work (onestep/stepbench.py). On a GPU each row also carries the peak memory of each phase of
the step (forward, backward, optimizer of each turn) in its JSON.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    from onestep.cli import Parser

    p = Parser(description=__doc__)
    p.add_argument("--preset", default="digits", help="network configs, not distill.py's presets: digits (the shipped "
                   "teacher), cifar, sd15 or sdxl (their architectures, random weights: no download); comma-separated "
                   "for several")
    p.add_argument("--variants", default="", help="comma-separated: fp32, tf32, bf16, bf16-compile, "
                                                  "bf16-reduce-overhead, bf16-max-autotune (default: fp32 on the "
                                                  "CPU; fp32,tf32,bf16,bf16-compile on a GPU; bf16 with "
                                                  "--simulate-memory)")
    p.add_argument("--batch-size", type=int, default=0, help="per step (0: the preset's)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--method", default="dmd", help="dmd or dmd2 (+ GAN head on the fake score; comma-separated: a row for each)")
    p.add_argument("--fake-score", default="copy", help="copy or lora (comma-separated: a row for each)")
    p.add_argument("--generator-lora", default="0", help="the generator: 0 (all its weights trained) or a LoRA rank "
                   "(an adapter on the teacher's shared weights, as --generator_lora_rank; comma-separated: a row for each)")
    p.add_argument("--gradient-checkpointing", nargs="?", const="on", default="off",
                   help="off, on or off,on (a bare flag: on) -- of the generator and the fake score")
    p.add_argument("--attention", default="sdpa", help="sdpa, xformers or auto (comma-separated: a row for each)")
    p.add_argument("--cudnn-benchmark", default="off", help="off, on or off,on: torch.backends.cudnn.benchmark")
    p.add_argument("--ema", default="on", help="on, off, offload (kept and updated in CPU memory) or several, "
                                               "comma-separated: the generator EMA (as the trainer keeps)")
    p.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit (bitsandbytes) or adamw,adamw8bit")
    p.add_argument("--sync", default="auto", help="where a non-finite update is skipped: auto (as the trainer: device "
                   "on a GPU with AdamW, else host), host (one read per update), device (no read), logs (host, and the "
                   "loss terms read each turn, as the trainer did before); comma-separated: a row for each")
    p.add_argument("--critic-pass", default="separate", help="separate, shared or separate,shared: the critic's "
                   "denoising loss on its own fake-score forward, or on the DM direction's (the shared_critic_pass "
                   "option of dmd / dmd2: one forward fewer per iteration)")
    p.add_argument("--no-components", action="store_true", help="skip timing the passes alone")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak, if not in the table")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--cpu-malloc", default="reuse", choices=("reuse", "system"),
                   help="CPU: 'reuse' keeps freed memory in the process, as the trainer does (onestep/hostmem.py); "
                        "'system': glibc's defaults (the baseline; one per run, it is process-wide)")
    p.add_argument("--simulate-memory", action="store_true",
                   help="estimate each row's peak GPU memory without a GPU (fake tensors; variants fp32, tf32, bf16; "
                        "no timings)")
    p.add_argument("--steps", type=int, default=3, help="--simulate-memory: iterations simulated (the first, then "
                                                        "the steady state)")
    p.add_argument("--out", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1 or args.batch_size < 0:
        p.error("--repeats and --warmup must be >= 1 and --batch-size >= 0")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step, then the steady state)")
    from onestep.cli import first_error, output_problem

    first_error(p, [args.device not in ("", "cuda", "cpu") and f"--device: unknown device {args.device!r}; use cuda or cpu",
                    args.threads < 0 and f"--threads must be >= 0 (0: torch's default), got {args.threads}",
                    args.peak_tflops != 0 and not 0 < args.peak_tflops < float("inf")
                    and f"--peak-tflops must be a finite number > 0 (0: the table's), got {args.peak_tflops}",
                    not [s for s in args.preset.split(",") if s] and "--preset: give at least one of digits, cifar, sd15, sdxl",
                    args.out and output_problem("--out", args.out, "file")])

    import torch

    from onestep.errors import OnestepError
    from onestep.optim import OPTIMIZERS, check_available
    from onestep.stepbench import (PRESETS, SIMULATED_VARIANTS, SYNC_MODES, VARIANTS, build_workload, markdown, measure,
                                   memory_markdown, simulate_memory)

    sim = args.simulate_memory
    device = torch.device("cpu") if sim else torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    from onestep import hostmem

    malloc = ("reuse" if hostmem.apply(args.cpu_malloc, device.type) else "system") if device.type == "cpu" else None
    presets = [s for s in args.preset.split(",") if s]
    variants = [v for v in args.variants.split(",") if v] or (
        ["bf16"] if sim else ["fp32", "tf32", "bf16", "bf16-compile"] if device.type == "cuda" else ["fp32"])
    for s in presets:
        if s not in PRESETS:
            p.error(f"--preset: unknown preset {s!r}; choose from {', '.join(PRESETS)}")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        if sim and v not in SIMULATED_VARIANTS:
            p.error(f"--variants: {v!r} cannot be simulated (compiled code is not); use {', '.join(SIMULATED_VARIANTS)}")
        if v != "fp32" and device.type != "cuda" and not sim:
            p.error(f"--variants: {v!r} needs a CUDA device; on the CPU use fp32 (or --simulate-memory for its memory)")
    def choices(name, value, allowed):
        items = [x for x in value.split(",") if x]
        for x in items:
            if x not in allowed:
                p.error(f"--{name}: unknown value {x!r}; choose from {', '.join(allowed)}")
        return items or p.error(f"--{name}: give at least one of {', '.join(allowed)}")

    onoff = {"on": True, "off": False}
    ranks = [x for x in args.generator_lora.split(",") if x]
    if not ranks or not all(x.isdigit() and int(x) <= 4096 for x in ranks):
        p.error(f"--generator-lora: expected LoRA ranks 0..4096 (0: the whole generator), got {args.generator_lora!r}")
    ranks = [int(x) for x in ranks]
    ema_modes = {**onoff, "offload": "offload"}
    options = [dict(method=me, fake_score=fs, gradient_checkpointing=onoff[gc], attention=at, cudnn_benchmark=onoff[cb],
                    ema=ema_modes[em], optimizer=op, sync=sy, shared_critic_pass=cp == "shared", generator_lora=gl)
               for me in choices("method", args.method, ("dmd", "dmd2"))
               for fs in choices("fake-score", args.fake_score, ("copy", "lora"))
               for gc in choices("gradient-checkpointing", args.gradient_checkpointing, tuple(onoff))
               for at in choices("attention", args.attention, ("sdpa", "xformers", "auto"))
               for cb in choices("cudnn-benchmark", args.cudnn_benchmark, tuple(onoff))
               for em in choices("ema", args.ema, tuple(ema_modes))
               for op in choices("optimizer", args.optimizer, OPTIMIZERS)
               for sy in choices("sync", args.sync, SYNC_MODES)
               for cp in choices("critic-pass", args.critic_pass, ("separate", "shared"))
               for gl in ranks]
    for o in {o["optimizer"] for o in options}:
        try:  # before any row is measured
            check_available(o)
        except OnestepError as e:
            p.error(str(e))
    if device.type != "cuda" and any(o["attention"] == "xformers" for o in options):
        p.error("--attention xformers needs a CUDA device; on the CPU use sdpa")
    if sim and (any(o["cudnn_benchmark"] or o["sync"] != "auto" for o in options) or args.device or args.threads):
        p.error("--simulate-memory: --cudnn-benchmark, --sync, --device and --threads do not apply (drop them)")
    rows = []
    try:
        for s in presets:
            if sim:  # the same rows, their memory estimated instead of timed
                for v in variants:
                    for o in options:
                        kept = ("method", "fake_score", "gradient_checkpointing", "attention", "ema", "optimizer",
                                "shared_critic_pass", "generator_lora")
                        rows.append(simulate_memory(s, v, batch_size=args.batch_size or None, steps=args.steps,
                                                    **{k: o[k] for k in kept}))
                        print(json.dumps(rows[-1]), flush=True)
                continue
            work = build_workload(s, device, args.batch_size or None)
            flops = {}
            for v in variants:
                for o in options:
                    key = (o["method"], o["fake_score"], o["gradient_checkpointing"], o["shared_critic_pass"],
                           o["generator_lora"])
                    row = measure(work, v, device, warmup=args.warmup, repeats=args.repeats, **o,
                                  peak=args.peak_tflops or None, flops=flops.get(key),
                                  components=not args.no_components)
                    if row["gflop_per_step"] is not None:
                        flops[key] = row["gflop_per_step"] * 1e9  # the same arithmetic for the compiled variants
                    row["cpu_malloc"] = malloc
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    except OnestepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(memory_markdown(rows) if sim else markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

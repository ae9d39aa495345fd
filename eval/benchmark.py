"""Benchmark teachers (at several sampler step counts) and exported one-step students with FID and friends.

    python eval/benchmark.py --teacher assets/digits-teacher --steps 1,2,4,10,25,50,100 \\
        --pipeline runs/digits-dmd2/pipeline --out runs/benchmark
    python eval/benchmark.py --pipeline runs/a/pipeline --pipeline runs/b/pipeline --out runs/ab
    python eval/benchmark.py --pipeline P --features inception --mode clean \\
        --inception-weights ~/inception-2015-12-05.pt --reference cleanfid:cifar10:32:train
    python eval/benchmark.py --images my_samples/ --features inception --reference real_images/  # any image folder
    python eval/benchmark.py --teacher sd15 --steps 25 --guidance 7.5 --pipeline runs/sd15-dmd2-dmd2/pipeline \\
        --prompts coco_prompts.txt --features inception --reference coco_images/  # text-to-image
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 eval/benchmark.py ...  # 2 processes

Every model draws the same samples: sample i from noise seed i (--seed 0) or a hash of (SEED, i), class i % K, quantised to 8 bits as a
PNG would store it, and streamed through the feature extractor into float64 moments (no files). Columns:
FID; KID, precision and recall (k = 3 nearest-neighbour manifolds) on --keep samples (each model's first;
of a folder reference, a seeded random subset, since files sorted by name are often sorted by class); class
accuracy and class-coverage entropy (1.0 = all classes equally often) with the digits classifier;
sampling seconds per image. Writes OUT/benchmark.md, OUT/benchmark.json, OUT/benchmark.png (FID vs NFE
and vs seconds per image) and, when the reference is computed here (not a .npz or cleanfid: statistics),
OUT/reference.npz (reuse it with --reference OUT/reference.npz; loading it with another extractor or mode is
refused). Text-to-image teachers and students (Stable Diffusion (XL)) draw
sample i from prompt i % P of --prompts (a file, one prompt per line): teachers through DDIM with classifier-free
guidance (--guidance) against the empty prompt, students through their stock pipeline's own call. --images folders (e.g. a text-to-image student's samples, saved
from its stock pipeline) are scored as they are: all of their images, no NFE or sampling time. With no models it
only computes the reference:

    python eval/benchmark.py --reference path/to/real/images --features inception --out runs/ref
"""
from __future__ import annotations

import argparse
import json
import os
import sys

STEPS = "1,2,4,10,25,50,100"


def parse_args(argv=None) -> argparse.Namespace:
    from onestep.cli import (Parser, asset_path, classifier_problem, eval_args_problem, first_error, num_samples_problem,
                             output_problem)

    p = Parser(description=__doc__)
    g = p.add_argument_group("models (none: only compute OUT/reference.npz)")
    g.add_argument("--teacher", action="append", default=[], help="teacher folder or hub id (repeatable)")
    g.add_argument("--steps", default=None, help=f"teacher DDIM step counts (default {STEPS})")
    g.add_argument("--guidance", type=float, default=None,
                   help="teacher classifier-free guidance scale (2 NFE/step if not 1; default 1)")
    g.add_argument("--pipeline", action="append", default=[],
                   help="exported OneStepPipeline folder, or a multi-student export (routed; repeatable)")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="text-to-image models: a prompt file, one per line (sample i uses prompt i %% P)")
    g.add_argument("--images", action="append", default=[], metavar="FOLDER",
                   help="a folder of generated images, scored as they are (all of them; e.g. a text-to-image "
                        "student's, saved from its stock pipeline; repeatable)")
    f = p.add_argument_group("features and reference")
    f.add_argument("--features", choices=["digits", "inception"], default="digits",
                   help="digits: the shipped digits network (+ class metrics); inception: clean-fid's Inception-v3")
    f.add_argument("--mode", choices=["clean", "legacy_tensorflow", "legacy_pytorch"], default=None,
                   help="clean-fid mode of the Inception features (resizing and weights; default clean)")
    f.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="local Inception weights (inception-2015-12-05.pt; legacy_pytorch: "
                        "pt_inception-2015-12-05-6726825d.pth); default $ONESTEP_INCEPTION_WEIGHTS, else clean-fid's")
    f.add_argument("--classifier", default=asset_path("assets/digits-classifier"), help="digits network folder")
    f.add_argument("--reference", default="digits",
                   help="digits[:all|train|test], an image folder, a statistics .npz (from an earlier --out), or "
                        "cleanfid:NAME:RES[:SPLIT] (clean-fid's stats; Inception only). Default %(default)s (1797 digits)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--num-samples", type=int, default=2000, help="samples per model (default %(default)s)")
    e.add_argument("--batch-size", type=int, default=250, help="affects speed only (default %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="sample i uses noise seed i (0, the default) or a hash of (SEED, i)")
    e.add_argument("--keep", type=int, default=10_000,
                   help="features kept for KID and precision / recall (0: FID only); default %(default)s")
    e.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0: torch's default); seconds per image on a CPU depend on it")
    e.add_argument("--out", default="runs/benchmark", help="output folder (default %(default)s)")
    a = p.parse_args(argv)
    if a.num_samples < 2 or a.batch_size < 1 or a.keep < 0 or a.threads < 0:
        p.error("--num-samples must be >= 2, --batch-size >= 1, --keep >= 0 and --threads >= 0 (0: torch's default)")
    if a.keep and min(a.keep, a.num_samples) <= 3:
        p.error(f"--keep {a.keep} with --num-samples {a.num_samples}: KID and precision / recall (k = 3 nearest "
                "neighbours) need more than 3 features of each model; raise both above 3, or --keep 0 for FID only")
    inception = a.features == "inception"
    a.new_out = not os.path.exists(a.out)  # created by the check below: removed again if the run then fails
    statistics = a.reference.endswith(".npz") or a.reference.startswith("cleanfid:")
    first_error(p, [
        num_samples_problem(a.num_samples), eval_args_problem(guidance=a.guidance, seed=a.seed),
        not a.teacher and a.steps is not None and "--steps sets the teachers' sampler; add --teacher or drop --steps",
        not a.teacher and a.guidance is not None and "--guidance sets the teachers' sampler; add --teacher or drop it",
        a.mode is not None and not inception and "--mode is the clean-fid mode of the Inception features; add "
                                                 "--features inception or drop --mode",
        a.inception_weights is not None and not inception and "--inception-weights are the Inception features' "
                                                               "network; add --features inception or drop them",
        not (a.teacher or a.pipeline or a.images) and statistics and f"nothing to score: --reference {a.reference} is "
                                                                    "statistics already; pass --pipeline, --teacher or --images",
        not inception and classifier_problem(a.classifier),
        lambda: output_problem("--out", a.out)])
    a.mode, a.steps = a.mode or "clean", STEPS if a.steps is None else a.steps
    a.guidance = 1.0 if a.guidance is None else a.guidance
    return a


def build(a, device):
    """(extractor, models) from the arguments; raises OnestepError for bad input."""
    from onestep.benchmark import (BenchmarkError, check_inputs, images_model, parse_steps, pipeline_model,
                                   teacher_models)
    from onestep.features import digits_extractor, inception_extractor
    from onestep.loading import is_text_teacher
    from onestep.streaming import is_text_pipeline

    from onestep.prompt_sources import PromptSource
    from onestep.prompts import read_prompts

    steps = parse_steps(a.steps)
    prompts = read_prompts(a.prompts) if a.prompts is not None else None
    for path in a.pipeline:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"pipeline folder {path!r} " + ("is a file" if os.path.exists(path) else "does not exist"))
    text = [f"teacher {t!r}" for t in a.teacher if is_text_teacher(t)] + [
        f"pipeline {p!r}" for p in a.pipeline if is_text_pipeline(p)]
    if text and a.features == "digits":  # before any model loads
        raise BenchmarkError(f"{text[0]} is text-to-image (RGB images); the digits features take 1x8x8 digits: "
                             "use --features inception")
    if a.features == "digits":
        extractor = digits_extractor(a.classifier, device)
    else:
        extractor = inception_extractor(a.mode, a.inception_weights, device)
    models = [m for t in a.teacher for m in teacher_models(t, steps, a.num_samples, a.guidance, a.seed, device, prompts)]
    models += [pipeline_model(p, a.num_samples, a.seed, device, prompts) for p in a.pipeline]
    models += [images_model(p, extractor) for p in a.images]
    if prompts is not None and not any(isinstance(m.source, PromptSource) for m in models):
        raise BenchmarkError("--prompts is for text-to-image teachers and pipelines, and none is given; drop --prompts")
    check_inputs(models, extractor)
    return extractor, models


def main(argv=None) -> None:
    a = parse_args(argv)
    import torch
    from accelerate import Accelerator

    from onestep.benchmark import check_reference_size, evaluate_model, load_reference
    from onestep.cli import report
    from onestep.distributed import check_joined
    from onestep.errors import OnestepError

    if a.threads:
        torch.set_num_threads(a.threads)
    acc = Accelerator()
    try:
        check_joined(acc)
        extractor, models = build(a, acc.device)
        reference = load_reference(a.reference, extractor, a.batch_size, a.keep, acc)
        if models:
            check_reference_size(reference, a.keep)
            if a.keep and reference.features is None and acc.is_main_process:
                print("warning: the reference holds moments only (no features): KID and precision / recall are left "
                      "out; recompute it with --keep N for them, or pass --keep 0", file=sys.stderr)
        rows = []
        for m in models:
            keep = a.keep if m.model == "images" else min(a.keep, a.num_samples)  # a folder scores all its images
            rows.append(evaluate_model(m, extractor, reference, a.batch_size, keep, accelerator=acc))
            if acc.is_main_process:
                print(f"{m.model} {m.path} steps {m.steps}: FID {rows[-1]['fid']:.3f}", file=sys.stderr)
    except (OnestepError, OSError) as err:
        if acc.is_main_process and a.new_out and os.path.isdir(a.out) and not os.listdir(a.out):
            os.rmdir(a.out)
        report(err)
        sys.exit(2)
    if acc.is_main_process:
        write(a, rows, reference)
    acc.wait_for_everyone()
    acc.end_training()  # with the process group, so that none is torn down at interpreter exit


def write(a, rows: list[dict], reference) -> None:
    """Print the table; write benchmark.md / .json / .png and the reference statistics under --out."""
    import torch

    from onestep.benchmark import markdown_table, plot_benchmark

    os.makedirs(a.out, exist_ok=True)
    if not a.reference.endswith(".npz") and not a.reference.startswith("cleanfid:"):
        reference.save(os.path.join(a.out, "reference.npz"))
        print(f"wrote {a.out}/reference.npz ({reference.meta['count']} images)", file=sys.stderr)
    if not rows:
        return
    table = markdown_table(rows)
    print(table)
    with open(os.path.join(a.out, "benchmark.md"), "w") as f:
        f.write(table + "\n")
    info = {"reference": reference.meta, "features": a.features, "mode": a.mode if a.features == "inception" else None,
            "num_samples": a.num_samples, "seed": a.seed, "guidance": a.guidance if a.teacher else None,
            "prompts": a.prompts, "threads": torch.get_num_threads(), "rows": rows}
    with open(os.path.join(a.out, "benchmark.json"), "w") as f:
        json.dump(info, f, indent=2)
    plot_benchmark(rows, os.path.join(a.out, "benchmark.png"))
    print(f"wrote {a.out}/benchmark.md, benchmark.json, benchmark.png", file=sys.stderr)


if __name__ == "__main__":
    import torch

    torch.set_grad_enabled(False)
    main()

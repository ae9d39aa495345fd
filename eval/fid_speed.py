"""Time FID-N end to end for a CIFAR-size one-step generator: sampling, 8-bit quantisation, clean-fid's 'clean'
resize to 299x299, Inception-v3 pool features and float64 moments, streamed batch by batch (onestep.streaming).

    python eval/fid_speed.py --inception-weights inception-2015-12-05.pt       # a GPU: FID-50k's time
    python eval/fid_speed.py                                                   # no weights: a stand-in network

The generator is google/ddpm-cifar10-32's UNet config with random weights, one step at t=999, bf16 autocast on a
GPU (the time of a generator does not depend on its weights). With --inception-weights the features are
clean-fid's own network; without, an Inception-v3 of torchvision's architecture with random weights stands in
(the same layers and arithmetic, so about the same time). It prints times, not an FID value (eval/benchmark.py
computes FID against reference statistics through the same code), and the time of the Frechet distance from the
2048-d moments (onestep.fid.frechet_distance, on the device; --fid-baseline: also clean-fid's scipy one). On a GPU, in the same run, the per-image CPU
resize that clean-fid itself uses is timed on --baseline-samples samples against the batched GPU resize.
--layouts nchw,nhwc and --generator eager,compile add a row per combination (the features in channels-last layout;
the generator's network compiled) and print the FID between their statistics, which differ only by rounding (the
same seeds, so the same samples).
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_inception(device):
    """torchvision's Inception-v3 (random weights, 2048-d pool output) on [0, 255] inputs: clean-fid's network's
    arithmetic."""
    import torch
    import torchvision

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
            self.net.fc = torch.nn.Identity()

        def forward(self, x):
            return self.net(x / 127.5 - 1)

    return Scaled().eval().to(device)


def main(argv: list[str]) -> int:
    from onestep.cli import MAX_SAMPLES, Parser, first_error, output_problem

    p = Parser(description=__doc__)
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--baseline-samples", type=int, default=2_000, help="samples for the per-image CPU resize baseline "
                   "(0: no baseline)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--inception-weights", default="", help="clean-fid's inception-2015-12-05.pt (else timing only)")
    p.add_argument("--layouts", default="nchw", help="the feature network's layout: nchw, nhwc (channels last) or "
                   "nchw,nhwc (a row each, and the FID between their statistics on the same samples)")
    p.add_argument("--generator", default="eager", help="eager, compile (torch.compile of the generator's network; "
                   "compilation falls in the untimed warm-up) or eager,compile")
    p.add_argument("--fid-baseline", action="store_true", help="also time clean-fid's own Frechet distance (scipy "
                   "sqrtm on the CPU) on the same moments")
    p.add_argument("--device", default="", help="cuda (default) or cpu; without a GPU pass --device cpu and a small --num-samples")
    p.add_argument("--out", default="", help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    layouts = [x for x in a.layouts.split(",") if x]
    generators = [x for x in a.generator.split(",") if x]
    weights = a.inception_weights and os.path.isdir(a.inception_weights) and \
        f"--inception-weights {a.inception_weights!r} is a folder; pass the inception-2015-12-05.pt file"
    first_error(p, [
        (min(a.num_samples, a.batch_size) < 1 or a.baseline_samples < 0) and
        "--num-samples and --batch-size must be >= 1, --baseline-samples >= 0",
        max(a.num_samples, a.baseline_samples) > MAX_SAMPLES and
        f"--num-samples and --baseline-samples must be at most {MAX_SAMPLES:,} (FID-50k uses 50,000); pass smaller counts",
        a.device not in ("", "cuda", "cpu") and f"--device: unknown device {a.device!r}; use cuda or cpu",
        weights, a.out and output_problem("--out", a.out, "file"),
        (not layouts or set(layouts) - {"nchw", "nhwc"} or not generators or set(generators) - {"eager", "compile"})
        and "--layouts takes nchw and/or nhwc, --generator eager and/or compile"])

    import dataclasses

    import torch
    from cleanfid.resize import build_resizer

    from onestep.errors import OnestepError
    from onestep.features import Extractor, channels_last, inception_extractor, pil_bicubic_resize
    from onestep.fid import frechet_distance
    from onestep.generator import Generator
    from onestep.stepbench import build_workload
    from onestep.streaming import GeneratorSource, stream_features

    if not a.device and not torch.cuda.is_available():
        minutes = a.num_samples / 9 / 60  # ~9 img/s through Inception on 2 cores
        took = f"about {minutes / 60:.1f} hours" if minutes >= 90 else f"about {max(minutes, 0.1):.1f} minutes"
        print(f"error: no CUDA device here; FID-{a.num_samples} on the CPU takes {took} (~9 img/s on 2 cores): pass "
              "--device cpu to time it there (a small --num-samples, e.g. 500)", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    device = torch.device(a.device or "cuda")

    def make_extractor(layout: str) -> Extractor:  # a fresh network each time: channels_last converts in place
        if a.inception_weights:
            ex = inception_extractor("clean", a.inception_weights, device=str(device))
        else:
            ex = Extractor("inception_v3 (random weights: timing only)", "clean", 3, random_inception(device),
                           resize=build_resizer("clean"), resize_batch=pil_bicubic_resize, device=device)
        return channels_last(ex) if layout == "nhwc" else ex

    try:
        extractor = make_extractor(layouts[0])
    except OnestepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = build_workload("cifar", device)
    gen = Generator(work.teacher.to(device)).eval()
    bf16 = device.type == "cuda"

    def sampler(g):
        def sample(z, y):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return g.sample(z, y).float()
        return sample

    def timed(n: int, ex: Extractor, sample) -> dict:
        t0 = time.perf_counter()
        warm = min(n, a.batch_size + n % a.batch_size)  # a full batch and the last one's shape, not the whole job
        src = GeneratorSource(sample, warm, work.shape, None, 0, device)
        stream_features(src, ex, min(a.batch_size, n))  # warm-up: cuDNN, allocator, the resize matrices, compilation
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        r = stream_features(GeneratorSource(sample, n, work.shape, None, 1, device), ex, a.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t1
        return {"samples": n, "seconds": total, "sampling_seconds": r.sample_seconds, "img_per_s": n / total,
                "warmup_seconds": t1 - t0, "result": r}

    rows = {}
    if a.baseline_samples and extractor.resize_batch is not None and device.type == "cuda":
        per_image = dataclasses.replace(extractor, resize_batch=None)
        rows["per-image CPU resize (clean-fid's)"] = timed(a.baseline_samples, per_image, sampler(gen))
        rows["batched resize on the GPU"] = timed(a.baseline_samples, extractor, sampler(gen))
    for kind in generators:
        g = gen
        if kind == "compile":
            import copy

            g = copy.deepcopy(gen)
            g.denoiser.backbone.compile()
        for layout in layouts:
            ex = extractor if layout == layouts[0] else make_extractor(layout)
            rows[f"end to end, {'compiled' if kind == 'compile' else kind} generator, {layout.upper()} features"] = timed(a.num_samples, ex, sampler(g))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print("| path | device | samples | seconds | img/s | of which sampling s | warm-up s |\n|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {card} | {r['samples']} | {r['seconds']:.2f} | {r['img_per_s']:.0f} | "
              f"{r['sampling_seconds']:.2f} | {r['warmup_seconds']:.1f} |")
    out = {k: {kk: v for kk, v in r.items() if kk != "result"} for k, r in rows.items()}
    ends = [r["result"].stats.moments() for k, r in rows.items() if k.startswith("end to end")]
    # FID from the moments, timed: between the variants' statistics (the same samples, so what their rounding moves
    # FID), or with one variant against itself (the same arithmetic as against a reference's)
    t0 = time.perf_counter()
    between = [frechet_distance(ends[0], e, device=device) for e in (ends[1:] or ends[:1])]
    out["fid_from_moments_seconds"] = (time.perf_counter() - t0) / len(between)
    print(f"FID from the {len(ends[0][0])}-d moments (onestep.fid.frechet_distance on {device.type}): "
          f"{out['fid_from_moments_seconds']:.2f} s")
    if len(ends) > 1:
        out["fid_between_variants_max"] = max(between)
        print(f"FID between the variants' statistics (same samples): at most {out['fid_between_variants_max']:.2e}")
    if a.fid_baseline:  # clean-fid's scipy sqrtm distance on the same moments, for comparison
        from cleanfid.fid import frechet_distance as cleanfid_distance

        t0 = time.perf_counter()
        cleanfid_distance(*ends[0], *ends[-1])
        out["fid_seconds_cleanfid_sqrtm"] = time.perf_counter() - t0
        print(f"clean-fid's Frechet distance (scipy sqrtm, CPU) on the same moments: "
              f"{out['fid_seconds_cleanfid_sqrtm']:.2f} s")
    out["features"], out["device"] = extractor.name, card
    print(json.dumps(out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

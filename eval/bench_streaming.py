"""Streaming FID vs the PNG round-trip through clean-fid's folder mode: same samples, same features, one run.

    python eval/bench_streaming.py --pipeline runs/digits-dmd2/pipeline --num-samples 10000
    python eval/bench_streaming.py --teacher assets/digits-teacher          # the teacher at 1 step

Both paths draw the same N samples (sample i: noise seed i, class i % 10) from the generator and score
them with the digits network against all 1797 digits:
  streaming  sample -> uint8 levels -> features -> float64 moments (onestep.streaming), reference in memory;
  clean-fid  sample -> N PNG files -> cleanfid.fid.compute_fid(fdir1, fdir2, custom_feat_extractor=the same
             network, num_workers=0), which reads both folders back (the reference PNGs are written untimed).
Prints the times of both (with the sampling time inside each), the ratios end to end and of the evaluation
alone (time beyond sampling), and both FIDs (which agree).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time


def write_pngs(source, folder: str, batch_size: int) -> float:
    """The source's images as 8-bit PNG files 000000.png, 000001.png, ...; returns the sampling seconds."""
    import torch
    from PIL import Image

    from onestep.streaming import to_uint8_levels

    os.makedirs(folder, exist_ok=True)
    sampling = 0.0
    for idx in torch.arange(len(source)).split(batch_size):
        t0 = time.perf_counter()
        x = source(idx)
        sampling += time.perf_counter() - t0
        ims = to_uint8_levels(x).to(torch.uint8).cpu().numpy()
        for i, im in zip(idx.tolist(), ims):
            Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)).save(os.path.join(folder, f"{i:06d}.png"))
    return sampling


def main(argv=None) -> None:
    from onestep.cli import Parser, asset_path, classifier_problem, first_error, num_samples_problem

    p = Parser(description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pipeline", default="runs/digits-dmd2/pipeline", help="exported OneStepPipeline (default %(default)s)")
    src.add_argument("--teacher", help="a teacher, sampled with 1 DDIM step, instead of a pipeline")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--classifier", default=asset_path("assets/digits-classifier"))
    a = p.parse_args(argv)
    first_error(p, [num_samples_problem(a.num_samples), a.batch_size < 1 and f"--batch-size must be >= 1, got "
                    f"{a.batch_size}", classifier_problem(a.classifier)])

    import torch
    from cleanfid.fid import compute_fid

    from onestep.benchmark import check_inputs, pipeline_model, teacher_models
    from onestep.data import load_digits
    from onestep.errors import OnestepError
    from onestep.features import digits_extractor
    from onestep.fid import frechet_distance
    from onestep.streaming import TensorSource, stream_features

    try:
        ex = digits_extractor(a.classifier)
        m = (teacher_models(a.teacher, [1], a.num_samples)[0] if a.teacher else pipeline_model(a.pipeline, a.num_samples))
        check_inputs([m], ex, "this script compares the two paths on digits models only")
    except (OnestepError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    digits = TensorSource(load_digits("all")[0])
    m.source(torch.arange(2))  # warm-up
    stream_features(digits, ex)

    t0 = time.perf_counter()
    fake = stream_features(m.source, ex, a.batch_size)
    real = stream_features(digits, ex, a.batch_size)
    fid_stream = frechet_distance(fake.stats.moments(), real.stats.moments())
    t_stream = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        write_pngs(digits, os.path.join(tmp, "real"), a.batch_size)  # untimed: a reference folder already exists
        t0 = time.perf_counter()
        png_sampling = write_pngs(m.source, os.path.join(tmp, "fake"), a.batch_size)
        t_write = time.perf_counter() - t0
        fid_folder = compute_fid(os.path.join(tmp, "fake"), os.path.join(tmp, "real"), mode="clean",
                                 custom_feat_extractor=ex, custom_fn_resize=lambda im: im, num_workers=0,
                                 batch_size=a.batch_size, device=torch.device("cpu"), verbose=False)
        t_png = time.perf_counter() - t0

    print(f"{m.model} {m.path} ({m.steps} step), {a.num_samples} samples, digits features, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    print(f"streaming FID:                     {t_stream:7.2f} s, of which sampling {fake.sample_seconds:.2f} s "
          f"(FID {fid_stream:.4f})")
    print(f"PNG files + clean-fid folder mode: {t_png:7.2f} s, of which sampling {png_sampling:.2f} s, writing "
          f"{t_write - png_sampling:.2f} s (FID {fid_folder:.4f})")
    over_stream, over_png = t_stream - fake.sample_seconds, t_png - png_sampling
    print(f"ratio, end to end: {t_png / t_stream:.1f}x; evaluation alone (time beyond sampling: "
          f"{over_stream:.2f} s vs {over_png:.2f} s): {over_png / over_stream:.1f}x")


if __name__ == "__main__":
    import torch

    torch.set_grad_enabled(False)  # here, not in main(): a caller in the same process keeps its autograd
    main()

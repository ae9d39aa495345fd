"""Digits-FID and class accuracy of a teacher at several sampler step counts, or of an exported pipeline.

    python eval/digits_fid.py --teacher assets/digits-teacher --steps 1,2,4,10,25,50,100
    python eval/digits_fid.py --pipeline runs/digits-dmd2/pipeline

Features: the shipped digits classifier's penultimate layer; reference: all 1797 digits; sample i: noise
seed i (--seed 0) or a hash of (SEED, i), class i % 10. With --cleanfid the samples go through clean-fid's own generator path instead
(`get_model_features` with the digits network as `custom_feat_extractor`, uint8 images) with clean-fid's noise
after torch.manual_seed(SEED): other samples than the default path's, so a slightly different FID; on the same
samples the two paths give the same FID (tests/test_fid.py). Prints a Markdown table and writes it as JSON with --json. The short form of
eval/benchmark.py (which adds KID, precision / recall, coverage entropy, timings and a plot).
"""
from __future__ import annotations

import json
import sys

import torch


def cleanfid_row(m, a, reference, net) -> dict:
    """FID and class accuracy of a benchmark model through clean-fid's get_model_features."""
    import numpy as np

    from onestep.fid import cleanfid_sample_features, frechet_distance

    src = m.source
    feats = cleanfid_sample_features(src.sample, net.features, a.num_samples, src.sample_shape, src.num_classes,
                                     seed=a.seed)
    row = {"model": m.model, "path": m.path, "steps": m.steps, "nfe": m.nfe, "num_samples": a.num_samples,
           "fid": frechet_distance((feats.mean(0), np.cov(feats, rowvar=False)), reference.moments),
           "feature_path": "clean-fid get_model_features"}
    if src.num_classes:
        pred = net.head(torch.from_numpy(feats).float()).argmax(1)
        row["class_accuracy"] = (pred == torch.arange(a.num_samples) % src.num_classes).float().mean().item()
    return row


def main(argv=None) -> None:
    from onestep.benchmark import (check_inputs, evaluate_model, load_reference, parse_steps, pipeline_model,
                                   teacher_models)
    from onestep.cli import Parser, asset_path, classifier_problem, eval_args_problem
    from onestep.errors import OnestepError
    from onestep.features import digits_extractor

    p = Parser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="teacher folder or hub id")
    src.add_argument("--pipeline", help="an exported OneStepPipeline folder")
    p.add_argument("--steps", default=None, help="teacher sampler step counts (DDIM, trailing; default 1,2,4,10,25,50,100)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale of the teacher")
    p.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, default=2000,
                   help="samples per model (default %(default)s)")
    p.add_argument("--classifier", default=asset_path("assets/digits-classifier"))
    p.add_argument("--seed", type=int, default=0, help="sample i uses noise seed i (0, the default) or a hash of (SEED, i); with --cleanfid: "
                   "torch.manual_seed(SEED) before clean-fid's own noise")
    p.add_argument("--cleanfid", action="store_true", help="run the samples through clean-fid's generator path")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)

    try:
        problem = eval_args_problem(a.num_samples, a.guidance, a.seed, a.json, a.pipeline)
        if problem:
            raise OnestepError(problem)
        if a.pipeline and (a.steps or a.guidance != 1.0):
            raise OnestepError("--steps and --guidance set the teacher's sampler; a pipeline runs its own steps")
        if problem := classifier_problem(a.classifier):
            raise OnestepError(problem)
        extractor = digits_extractor(a.classifier)
        if a.teacher:
            models = teacher_models(a.teacher, parse_steps(a.steps or "1,2,4,10,25,50,100"), a.num_samples, a.guidance,
                                    a.seed)
        else:
            models = [pipeline_model(a.pipeline, a.num_samples, a.seed)]
        check_inputs(models, extractor, "score it with eval/benchmark.py --features inception")
        grey = next((m for m in models if a.cleanfid and m.source.sample_shape[0] != 1), None)
        if grey:
            raise OnestepError(f"--cleanfid feeds the images to the digits network as they are (1x8x8); {grey.path!r} "
                               f"makes {tuple(grey.source.sample_shape)}: drop --cleanfid")
        reference = load_reference("digits:all", extractor, keep=0)
        if a.cleanfid:
            from onestep.fid import DigitsClassifier

            net = DigitsClassifier.load(a.classifier)
            rows = [cleanfid_row(m, a, reference, net) for m in models]
        else:
            rows = [evaluate_model(m, extractor, reference) for m in models]
    except (OnestepError, OSError) as e:
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

"""Streaming feature statistics: sources, per-sample seeds, batch- and process-count independence, clean-fid parity."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from onestep.data import load_digits
from onestep.features import digits_extractor
from onestep.fid import frechet_distance
from onestep.streaming import (FolderSource, GeneratorSource, SourceError, TensorSource, sample_seed, stream_features,
                               to_uint8_levels)

CLASSIFIER = "assets/digits-classifier"


@pytest.fixture(scope="module")
def ex():
    return digits_extractor(CLASSIFIER)


def shifted_tanh(z, labels):  # a deterministic "generator": the image depends on its noise and label only
    return torch.tanh(z + 0.1 * labels.view(-1, 1, 1, 1).float())


def save_pngs(images: torch.Tensor, folder) -> None:
    folder.mkdir()
    for i, im in enumerate(to_uint8_levels(images)[:, 0].to(torch.uint8).numpy()):
        Image.fromarray(im, mode="L").save(folder / f"{i:05d}.png")


def test_disjoint_digit_halves_are_close_and_do_not_depend_on_batch_size(ex):
    x, y = load_digits("all")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    a, b = perm[:898], perm[898:]
    fids = []
    for bs in (64, 1000):
        sa = stream_features(TensorSource(x[a], y[a]), ex, bs).stats.moments()
        sb = stream_features(TensorSource(x[b], y[b]), ex, bs).stats.moments()
        fids.append(frechet_distance(sa, sb))
    noise = stream_features(TensorSource(torch.rand(898, 1, 8, 8) * 2 - 1), ex).stats.moments()
    assert fids[0] == pytest.approx(fids[1], rel=1e-8)
    assert 0 < fids[0] < 0.05 * frechet_distance(sa, noise)


def test_generator_source_sample_i_is_fixed_by_its_index(ex):
    src = GeneratorSource(shifted_tanh, 50, (1, 8, 8), num_classes=10, seed=5)
    small = stream_features(src, ex, batch_size=7, keep=50)
    large = stream_features(src, ex, batch_size=50, keep=50)
    assert np.allclose(small.features, large.features, atol=1e-6)
    assert np.array_equal(small.labels, np.arange(50) % 10)
    z7 = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(sample_seed(5, 7)))
    assert torch.allclose(src(torch.tensor([7])), shifted_tanh(z7[None], torch.tensor([7])))
    a, b = (GeneratorSource(lambda z, y: z, 10, (1, 8, 8), seed=s)(torch.arange(10)) for s in (5, 6))
    assert not any(torch.equal(p, q) for p in a for q in b)  # two seeds share no sample's noise


def test_kept_features_are_a_generators_first_samples_and_a_random_subset_of_sorted_data(ex):
    """Generated samples are independent draws, so the first `keep` serve KID and precision / recall; images sorted
    by class (a folder sorted by name) give a seeded random subset over every class instead, at any batch size."""
    x, y = load_digits("all")
    order = torch.argsort(y, stable=True)
    data = TensorSource(x[order], y[order])
    a = stream_features(data, ex, batch_size=64, keep=200)
    b = stream_features(data, ex, batch_size=500, keep=200)
    assert a.features.shape[0] == 200 and np.allclose(a.features, b.features, atol=1e-6)
    from onestep.streaming import kept
    mask = kept(data, 200)
    assert int(mask.sum()) == 200 and len(set(y[order][mask].tolist())) == 10  # the first 200 are only 0s and 1s
    assert torch.equal(kept(GeneratorSource(shifted_tanh, 300, (1, 8, 8)), 200), torch.arange(300) < 200)
    with pytest.raises(SourceError, match="fewer processes"):
        stream_features(data, ex, accelerator=type("Acc", (), {"process_index": 0, "num_processes": 1800})())


@torch.no_grad()
def test_few_step_students_sample_i_depends_on_its_index_only(ex):
    """A 2-step student re-noises between its steps: that noise too is the sample's own (drawn from its z), so batch
    size, the global seed and the routing of the other samples change nothing."""
    from conftest import tiny_unet
    from diffusers import DDPMScheduler

    from onestep.denoiser import Denoiser
    from onestep.generator import Generator
    from onestep.multistudent import Router, routed_sample
    from onestep.schedule import Schedule

    sched = Schedule.from_scheduler_config(dict(DDPMScheduler().config))
    gens = [Generator(Denoiser(tiny_unet(seed=s), sched, null_cond=10), [999, 499]).eval() for s in (0, 1)]
    src = GeneratorSource(gens[0].sample, 30, (1, 8, 8), num_classes=10, seed=3)
    torch.manual_seed(0)
    small = stream_features(src, ex, batch_size=4, keep=30).features
    torch.manual_seed(1)
    large = stream_features(src, ex, batch_size=30, keep=30).features
    assert np.allclose(small, large, atol=1e-5)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    router = Router("balanced", [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    samplers = [g.sample for g in gens]
    alone = gens[0].sample(z[:1], torch.tensor([2]))
    for other in (3, 7):  # the second sample routed to the same student, then to the other one
        mixed = routed_sample(samplers, router, z[:2], torch.tensor([2, other]))
        assert torch.allclose(mixed[:1], alone, atol=1e-6)
    assert not torch.allclose(alone, gens[0].sample(z[1:2], torch.tensor([2])))  # another z, another chain


def test_fid_equals_clean_fid_folder_mode_on_the_same_features(ex, tmp_path):
    """PNG folders through clean-fid's compute_fid == our streaming statistics (folder and in-memory)."""
    from cleanfid import fid as cfid

    x, _ = load_digits("all")
    a, b = x[:300], x[300:650]
    save_pngs(a, tmp_path / "a")
    save_pngs(b, tmp_path / "b")
    theirs = cfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", custom_feat_extractor=ex,
                              custom_fn_resize=lambda im: im, device=torch.device("cpu"), num_workers=0,
                              batch_size=64, verbose=False)
    folder = [stream_features(FolderSource(str(tmp_path / d), ex.channels), ex, 100).stats.moments() for d in "ab"]
    memory = [stream_features(TensorSource(t), ex, 100).stats.moments() for t in (a, b)]
    assert frechet_distance(*folder) == pytest.approx(theirs, rel=1e-4)
    assert frechet_distance(*memory) == pytest.approx(theirs, rel=1e-4)


def test_folder_source_reports_missing_or_empty_folders(tmp_path):
    from onestep.streaming import SourceError

    with pytest.raises(SourceError, match="does not exist"):
        FolderSource(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="no images"):
        FolderSource(str(tmp_path))


def test_folders_of_mixed_sizes_are_resized_image_by_image_as_clean_fid_does(tmp_path):
    """Photos of several sizes (and .npy arrays, as clean-fid reads them): each image resized on its own by the
    extractor's resizer, unquantised, then its features: the FID clean-fid's folder mode computes."""
    from cleanfid import fid as cfid
    from cleanfid.resize import make_resizer

    from onestep.features import Extractor
    from onestep.streaming import SourceError

    rng = np.random.default_rng(0)
    for d, n in (("a", 40), ("b", 30)):
        (tmp_path / d).mkdir()
        for i in range(n):
            h, w = [(12, 20), (16, 16), (24, 18)][i % 3]
            im = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // (1 + (d == "b"))
            np.save(tmp_path / d / f"{i:03d}.npy", im) if i % 5 == 0 else Image.fromarray(im).save(tmp_path / d / f"{i:03d}.png")
    proj = torch.randn(3 * 16 * 16, 8, generator=torch.Generator().manual_seed(0))

    def feats(x):
        return x.flatten(1) @ proj / 255

    resize = make_resizer("PIL", False, "bicubic", (16, 16))
    ex = Extractor("proj", "native", 3, feats, resize=resize)
    ours = frechet_distance(*[stream_features(FolderSource(str(tmp_path / d), 3, resize), ex, 7).stats.moments()
                              for d in "ab"])
    theirs = cfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", custom_feat_extractor=feats,
                              custom_fn_resize=resize, device=torch.device("cpu"), num_workers=0, batch_size=7,
                              verbose=False)
    assert ours == pytest.approx(theirs, rel=1e-4) and ours > 1
    with pytest.raises(SourceError, match=r"images of different sizes \(000.npy 20x12, 001.png 16x16\) for an "):
        FolderSource(str(tmp_path / "a"), 3)(torch.arange(3))  # no resizer: one line, not a stacking error


@pytest.mark.parametrize("h,w", [(8, 8), (32, 32), (28, 40), (320, 300)])
def test_batched_clean_resize_equals_clean_fids_per_image_resizer(h, w):
    """The GPU path of the 'clean' Inception mode: the same 299x299 images as clean-fid's PIL resizer (up- and
    downsampling, non-square), to float32 rounding."""
    from cleanfid.resize import build_resizer

    from onestep.features import pil_bicubic_resize

    x = torch.randint(0, 256, (3, 3, h, w), generator=torch.Generator().manual_seed(h * w)).float()
    resize = build_resizer("clean")
    ref = torch.stack([torch.from_numpy(resize(im.permute(1, 2, 0).numpy())).permute(2, 0, 1) for im in x])
    out = pil_bicubic_resize(x)
    assert out.shape == ref.shape == (3, 3, 299, 299) and out.dtype == torch.float32
    assert (out - ref).abs().max() < 1e-3  # in 8-bit units: float32 rounding, not a different filter
    assert (out - torch.nn.functional.interpolate(x, (299, 299), mode="bicubic")).abs().max() > 0.5  # torch's differs


def test_rgb_to_grey_is_pils_conversion():
    from onestep.features import match_channels

    im = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    ours = match_channels(torch.from_numpy(im).permute(2, 0, 1)[None].float(), 1)[0, 0].numpy()
    assert np.array_equal(ours, np.asarray(Image.fromarray(im).convert("L")))


def test_unreadable_images_and_files_for_folders_are_named(tmp_path):
    save_pngs(torch.rand(3, 1, 8, 8) * 2 - 1, tmp_path / "f")
    png = (tmp_path / "f" / "00001.png").read_bytes()
    (tmp_path / "f" / "00001.png").write_bytes(png[:len(png) // 2])  # the header is read, the pixels are cut short
    src = FolderSource(str(tmp_path / "f"), 1)
    assert src.first_image_shape() == (1, 8, 8)
    with pytest.raises(SourceError, match=r"00001\.png' \(OSError: image file is truncated\); remove or replace"):
        src(torch.arange(3))
    with pytest.raises(SourceError, match="is a file; pass a folder of images"):
        FolderSource(str(tmp_path / "f" / "00000.png"))


def test_a_run_folder_passed_as_a_pipeline_names_the_export_inside(tmp_path):
    from onestep.streaming import pipeline_source

    (tmp_path / "run" / "pipeline").mkdir(parents=True)
    (tmp_path / "run" / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(SourceError, match=f"is a run folder.*pass '{tmp_path}/run/pipeline'"):
        pipeline_source(str(tmp_path / "run"), 10)
    with pytest.raises(SourceError, match="not an exported OneStepPipeline folder"):
        pipeline_source(str(tmp_path), 10)


def test_the_library_refuses_bad_sources_and_moments_before_any_sampling(ex):
    """What the command lines check, the library functions check too: one SourceError / OnestepError saying what."""
    from onestep.errors import OnestepError

    calls = []

    def gen(z, labels):
        calls.append(len(z))
        return torch.tanh(z)

    for kwargs, words in (({"seed": -3}, "seed must be an integer >= 0"), ({"num_samples": 0}, "num_samples must be"),
                          ({"num_classes": 0}, "num_classes must be None or an integer >= 1"),
                          ({"sample_shape": (8, 8)}, "sample_shape must be (C, H, W)")):
        with pytest.raises(SourceError, match=re.escape(words)):
            GeneratorSource(gen, **{"num_samples": 10, "sample_shape": (1, 8, 8), **kwargs})
    for shape, words in (((4, 8, 8), "4-channel images"), ((1, 16, 16), "take 1x8x8 images")):
        with pytest.raises(SourceError, match=words):
            stream_features(GeneratorSource(gen, 10, shape), ex)
    with pytest.raises(SourceError, match="batch_size must be a positive integer, got 0"):
        stream_features(GeneratorSource(gen, 10, (1, 8, 8)), ex, batch_size=0)
    assert calls == []  # nothing was sampled
    stats = stream_features(GeneratorSource(gen, 10, (1, 8, 8), seed=np.int64(2)), ex).stats
    assert frechet_distance(stats, stats.moments()) == pytest.approx(0, abs=1e-4)  # objects with .moments, or pairs
    with pytest.raises(OnestepError, match="64-d features against 3-d ones"):
        frechet_distance(stats.moments(), (np.zeros(3), np.eye(3)))
    with pytest.raises(OnestepError, match="takes \\(mean, covariance\\) pairs"):
        frechet_distance(stats.moments(), "digits")

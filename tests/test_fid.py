import numpy as np
import pytest
import torch

from onestep.data import load_digits
from onestep.errors import OnestepError
from onestep.fid import (DigitsClassifier, FeatureStats, cleanfid_sample_features, digits_moments, evaluate_samples,
                         frechet_distance, image_moments, quantize)

CLASSIFIER = "assets/digits-classifier"


@pytest.fixture(scope="module")
def net():
    return DigitsClassifier.from_pretrained(CLASSIFIER).eval()


def test_streaming_moments_equal_two_pass_numpy():
    f = torch.randn(1000, 16) * torch.linspace(0.1, 3, 16) + 5
    stats = FeatureStats(16)
    for chunk in f.split(77):
        stats.update(chunk)
    mu, cov = stats.moments()
    x = f.double().numpy()
    assert np.allclose(mu, x.mean(0)) and np.allclose(cov, np.cov(x, rowvar=False))


def test_moments_survive_a_large_offset_and_merge_in_any_split():
    f = torch.randn(900, 8, dtype=torch.float64) * 0.01 + 1e4  # raw sums of squares would cancel here
    x = f.numpy()
    whole, parts = FeatureStats(8), FeatureStats(8)
    whole.update(f)
    for chunk in f.split([1, 300, 599]):
        part = FeatureStats(8)
        part.update(chunk)
        parts.merge(part.n, part.mean, part.m2)
    for stats in (whole, parts):
        mu, cov = stats.moments()
        assert np.allclose(mu, x.mean(0), rtol=1e-12) and np.allclose(cov, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("n, dim", [(500, 128), (40, 64), (6, 96)], ids=["full-rank", "few-samples", "singular"])
def test_frechet_distance_equals_clean_fids_and_self_distance_is_zero(n, dim):
    """The eigendecomposition trace equals clean-fid's sqrtm formula (singular covariances included: fewer samples
    than dimensions); the distance of moments to themselves is 0 to rounding."""
    from cleanfid.fid import frechet_distance as cleanfid_distance

    rs = np.random.RandomState(dim)
    a = rs.randn(n, dim) @ rs.randn(dim, dim) * 0.1
    b = rs.randn(n, dim) @ rs.randn(dim, dim) * 0.1 + 0.2
    ma, mb = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    ours = frechet_distance(ma, mb)
    assert ours == pytest.approx(cleanfid_distance(*ma, *mb), rel=1e-6) and ours > 1
    assert abs(frechet_distance(ma, ma)) < 1e-6 * np.trace(ma[1])
    assert np.isnan(frechet_distance(ma, (mb[0], np.full_like(mb[1], np.nan))))


def test_self_fid_is_zero_and_halves_are_close(net):
    x, _ = load_digits("all")
    m = image_moments([x], net.features)
    assert abs(frechet_distance(m, m)) < 1e-6
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    a = image_moments([x[perm[:898]]], net.features)
    b = image_moments([x[perm[898:]]], net.features)
    noise = image_moments([torch.rand(898, 1, 8, 8) * 2 - 1], net.features)
    assert frechet_distance(a, b) < 0.05 * frechet_distance(a, noise)


def test_shipped_classifier_is_accurate_on_held_out_digits(net):
    x, y = load_digits("test")
    with torch.no_grad():
        assert (net(quantize(x)).argmax(1) == y).float().mean() > 0.95


def test_evaluation_does_not_depend_on_batch_size(net):
    x, _ = load_digits("all")
    ref = image_moments([x], net.features)

    def sample(z, labels):  # a "generator" that is deterministic in its noise
        return torch.tanh(z)

    a = evaluate_samples(sample, net, ref, 300, (1, 8, 8), 10, batch_size=64)
    b = evaluate_samples(sample, net, ref, 300, (1, 8, 8), 10, batch_size=300)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-9) and a["class_accuracy"] == b["class_accuracy"]
    assert a["coverage_entropy"] == b["coverage_entropy"] and 0 < a["coverage_entropy"] <= 1


def test_quantize_matches_png_levels():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.5])
    q = quantize(x)
    assert torch.allclose((q + 1) * 127.5, ((q + 1) * 127.5).round()) and q.max() == 1.0


def test_cleanfid_generator_path_matches_streaming_moments(net):
    """clean-fid's get_model_features with the digits extractor == streaming moments of the same samples."""
    ref = image_moments([load_digits("all")[0]], net.features)
    seen = []

    def sample(z, labels):  # deterministic in (z, label): a label-dependent shift
        seen.append(labels.clone())
        return torch.tanh(z + 0.1 * labels.view(-1, 1, 1, 1).float())

    feats = cleanfid_sample_features(sample, net.features, 300, (1, 8, 8), 10, batch_size=64, seed=3)
    assert feats.shape == (300, net.config.feature_dim)
    assert torch.equal(torch.cat(seen)[:300], torch.arange(300) % 10)
    fid_cleanfid = frechet_distance((feats.mean(0), np.cov(feats, rowvar=False)), ref)

    g = torch.Generator().manual_seed(3)  # clean-fid's draws: randn(batch, 64) from the seeded global generator
    z = torch.cat([torch.randn(64, 64, generator=g) for _ in range(5)])[:300].view(300, 1, 8, 8)
    stats = FeatureStats(net.config.feature_dim)
    stats.update(net.features(quantize(torch.tanh(z + 0.1 * (torch.arange(300) % 10).view(-1, 1, 1, 1).float()))))
    assert fid_cleanfid == pytest.approx(frechet_distance(stats.moments(), ref), rel=1e-4)


def test_best_of_steps_keeps_the_lowest_fid_and_handles_no_runs():
    from onestep.fid import best_of_steps

    runs = {10: {"fid": 0.7, "nfe": 10}, 100: {"fid": 0.2, "nfe": 100}, 50: {"fid": 0.25, "nfe": 50}}
    assert best_of_steps(runs) == {"fid": 0.2, "nfe": 100, "by_steps": {"10": 0.7, "100": 0.2, "50": 0.25}}
    assert best_of_steps({}) == {"fid": None, "nfe": None}


def test_a_run_on_some_classes_is_scored_on_those_classes(net):
    """Sample i asks for class_ids[i % K]: a "generator" returning real digits of the asked class scores as
    accurate and covering over those K classes, against the digits of those classes."""
    x, y = load_digits("all")
    ids = [3, 5, 7]
    first = {c: torch.nonzero(y == c).squeeze(1) for c in ids}

    def real_digits(z, labels):  # the k-th sample of class c: the (k mod count)-th digit c
        k = (z.flatten(1)[:, 0].abs() * 1e4).long()
        return torch.stack([x[first[int(c)][int(i) % len(first[int(c)])]] for c, i in zip(labels, k)])

    ref = digits_moments(net, ids)
    r = evaluate_samples(real_digits, net, ref, 300, (1, 8, 8), len(ids), class_ids=ids)
    assert r["class_accuracy"] > 0.95 and r["coverage_entropy"] > 0.99
    assert r["fid"] < 0.5 * frechet_distance(image_moments([x], net.features), ref)  # the classes' own reference
    assert digits_moments(net, list(range(10)))[0] == pytest.approx(image_moments([x], net.features)[0])


def test_moments_of_fewer_than_two_features_are_refused():
    stats = FeatureStats(4)
    stats.update(torch.randn(1, 4))
    with pytest.raises(OnestepError, match="at least 2"):
        stats.moments()

import numpy as np
import pytest
import torch

from onestep.data import load_digits
from onestep.fid import DigitsClassifier, FeatureStats, evaluate_samples, frechet_distance, image_moments, quantize

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


def test_quantize_matches_png_levels():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.5])
    q = quantize(x)
    assert torch.allclose((q + 1) * 127.5, ((q + 1) * 127.5).round()) and q.max() == 1.0

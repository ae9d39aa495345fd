"""KID, precision / recall, class metrics, reference files and Inception weights handling (no network)."""
import numpy as np
import pytest
import torch
from torch import nn

from onestep.features import FeatureError, callable_extractor, digits_extractor, inception_extractor
from onestep.metrics import MetricsError, class_metrics, kid, precision_recall
from onestep.reference import Reference, ReferenceError, cleanfid_reference, digits_reference

CLASSIFIER = "assets/digits-classifier"


def blobs(n, seed, shift=0.0, dim=16):
    return np.random.default_rng(seed).normal(size=(n, dim)) + shift


def test_identical_sets_have_full_precision_recall_and_zero_kid():
    a = blobs(400, 0)
    far = blobs(400, 1, shift=50.0)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert abs(kid(a, a, num_subsets=10)) < 1e-3 * kid(a, far, num_subsets=10)
    assert precision_recall(a, far) == (0.0, 0.0)


def test_precision_and_recall_separate_quality_from_coverage():
    real = blobs(1000, 0, dim=2)
    half = real[real[:, 0] < 0]  # realistic samples that cover only half of the data
    precision, recall = precision_recall(real, half, k=3, chunk=64)
    assert precision > 0.95 and recall < 0.7


def test_coverage_entropy_drops_for_a_collapsed_generator():
    labels = np.arange(1000) % 10
    uniform = class_metrics(labels.copy(), labels, 10)
    collapsed = class_metrics(np.where(labels < 5, labels, 0), labels, 10)  # half the classes come out as 0
    assert uniform["coverage_entropy"] == pytest.approx(1.0) and uniform["class_accuracy"] == 1.0
    assert collapsed["coverage_entropy"] < uniform["coverage_entropy"]
    assert collapsed["per_class_accuracy"][0] == 1.0 and collapsed["per_class_accuracy"][7] == 0.0


def test_class_metrics_over_some_classes_and_too_few_features_for_kid_or_knn():
    labels = np.array([3, 5, 7] * 20)
    m = class_metrics(np.where(labels == 7, 1, labels), labels, 10, classes=[3, 5, 7])  # class 7 comes out as 1
    assert m["class_accuracy"] == pytest.approx(2 / 3) and m["per_class_accuracy"] == [1.0, 1.0, 0.0]
    assert m["coverage_entropy"] == pytest.approx(np.log(2) / np.log(3))  # 3 and 5 equally often, 7 never
    assert class_metrics(labels, labels, 10, classes=[3, 5, 7])["coverage_entropy"] == pytest.approx(1.0)
    assert class_metrics(labels[:1], labels[:1], 10, classes=[3])["coverage_entropy"] is None
    with pytest.raises(MetricsError, match="--keep"):
        precision_recall(blobs(3, 0), blobs(50, 1))
    with pytest.raises(MetricsError, match="--keep"):
        kid(blobs(1, 0), blobs(50, 1))


def test_reference_file_round_trips_and_refuses_another_extractor(tmp_path):
    ex = digits_extractor(CLASSIFIER)
    ref = digits_reference(ex, "test", keep=100)
    path = str(tmp_path / "ref.npz")
    ref.save(path)
    back = Reference.load(path, ex)
    assert np.array_equal(back.mu, ref.mu) and back.features.shape == (100, 64)
    assert back.meta["count"] == 360 and back.meta["image_size"] == [1, 8, 8] and back.meta["mode"] == "native"
    other = callable_extractor(lambda x: x.flatten(1), "pixels", channels=1)
    with pytest.raises(ReferenceError, match="extractor 'digits'"):
        Reference.load(path, other)
    np.savez(tmp_path / "bare.npz", mu=ref.mu, sigma=ref.sigma)
    with pytest.raises(ReferenceError, match="no onestep metadata"):
        Reference.load(str(tmp_path / "bare.npz"), ex)
    from onestep.fid import DigitsClassifier

    torch.manual_seed(0)
    untrained = digits_extractor(DigitsClassifier())
    with pytest.raises(ReferenceError, match=f"other weights of the 'digits' extractor .fingerprint {ex.weights}, not"):
        Reference.load(path, untrained)  # same name and mode, another network: its features are another space
    assert digits_extractor(CLASSIFIER).weights == ex.weights  # the same weights, loaded again
    (tmp_path / "noise.npz").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ReferenceError, match="noise.npz is not reference statistics written by onestep"):
        Reference.load(str(tmp_path / "noise.npz"), ex)


def test_clean_fid_custom_statistics_follow_clean_fids_naming():
    from onestep.reference import cleanfid_stats_path

    assert cleanfid_stats_path("mine", 32, "clean", "custom").endswith("stats/mine_clean_custom_na.npz")
    assert cleanfid_stats_path("cifar10", 32, "clean", "train").endswith("stats/cifar10_clean_train_32.npz")


def test_missing_clean_fid_statistics_say_where_to_put_them():
    with pytest.raises(ReferenceError, match=r"download https://www\.cs\.cmu\.edu/~clean-fid/stats/nonexistent_set_clean_"
                                             r"train_32\.npz and put it at .*stats/nonexistent_set"):
        cleanfid_reference("nonexistent_set", 32, "clean", "train")


def test_missing_inception_weights_give_one_clear_line(tmp_path, monkeypatch):
    missing = str(tmp_path / "nowhere" / "inception-2015-12-05.pt")
    with pytest.raises(FeatureError) as e:
        inception_extractor("clean", missing)
    msg = str(e.value)
    assert "\n" not in msg and missing in msg and "/tmp/inception-2015-12-05.pt" in msg
    assert "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt" in msg
    monkeypatch.setenv("ONESTEP_INCEPTION_WEIGHTS", missing)
    with pytest.raises(FeatureError, match="--inception-weights"):
        inception_extractor("legacy_tensorflow")
    # legacy_pytorch reads pytorch-fid's state dict from torch's hub folder; offline and absent -> refused
    monkeypatch.delenv("ONESTEP_INCEPTION_WEIGHTS")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(FeatureError, match=r"pt_inception-2015-12-05-6726825d\.pth.*put it at .*hub/checkpoints"):
            inception_extractor("legacy_pytorch")
    finally:
        torch.hub.set_dir(old)
    with pytest.raises(FeatureError, match="mode must be one of"):
        inception_extractor("fast")


@pytest.mark.parametrize("offline", ["true", "YES", ""])
def test_the_default_inception_file_absent_offline_or_broken_is_one_line(tmp_path, monkeypatch, offline):
    """Where clean-fid keeps the weights: absent, with HF_HUB_OFFLINE true (any of huggingface_hub's spellings) or
    no route to the download (an unreachable host stands for it), one line and no download; a file there that
    is not the weights (a cut-off download) is named, not a traceback."""
    import onestep.features as features

    default = tmp_path / "inception-2015-12-05.pt"
    monkeypatch.setattr(features, "default_weights_path", lambda mode: str(default))
    monkeypatch.setattr(features, "weights_url", lambda mode: "http://127.0.0.1:9/inception-2015-12-05.pt")
    monkeypatch.setattr(features, "build_feature_extractor", None, raising=False)  # must not be reached
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(FeatureError, match=r"are not at .*inception-2015-12-05\.pt and cannot be downloaded"):
        inception_extractor("clean")
    default.write_bytes(b"partial")
    with pytest.raises(FeatureError, match=r"inception-2015-12-05\.pt is not inception-2015-12-05\.pt"):
        inception_extractor("clean")


class _Layers(nn.Module):  # a stand-in with the TorchScript Inception's interface (pool, then a 1x1 conv)
    def __init__(self):
        super().__init__()
        self.pool, self.conv = nn.AdaptiveAvgPool2d(4), nn.Conv2d(3, 128, 4)

    def forward(self, x):
        return self.conv(self.pool(x)).repeat(1, 16, 1, 1)


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


def test_given_weights_file_runs_through_clean_fids_network_and_resizer(tmp_path):
    """A weights file under any name is used; features equal clean-fid's own folder path (PIL bicubic resize)."""
    from PIL import Image
    from cleanfid.fid import get_folder_features

    torch.manual_seed(0)
    weights = str(tmp_path / "my-inception.pt")
    torch.jit.script(_Base()).save(weights)
    ex = inception_extractor("clean", weights)
    imgs = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    (tmp_path / "png").mkdir()
    for i, im in enumerate(imgs.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(tmp_path / "png" / f"{i}.png")
    theirs = get_folder_features(str(tmp_path / "png"), ex.fn, num_workers=0, batch_size=4, device=torch.device("cpu"),
                                 mode="clean", verbose=False)
    ours = ex(imgs.float()).numpy()
    assert ours.shape == (6, 2048) and np.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ex.meta == {"extractor": "inception_v3", "mode": "clean", "weights": ex.weights} and len(ex.weights) == 16
    # statistics are tied to the weights file that made them: another file's are refused, ones without a record
    # (clean-fid's named statistics, older files) are taken
    ref = Reference(np.zeros(2048), np.eye(2048), {**ex.meta, "count": 6, "image_size": [3, 12, 12]})
    ref.check(ex)
    torch.manual_seed(1)
    torch.jit.script(_Base()).save(str(tmp_path / "other.pt"))
    other = inception_extractor("clean", str(tmp_path / "other.pt"))
    with pytest.raises(ReferenceError, match="other weights of the 'inception_v3' extractor"):
        ref.check(other)
    Reference(ref.mu, ref.sigma, {"extractor": "inception_v3", "mode": "clean"}).check(other)
    with pytest.raises(FeatureError, match="is not pt_inception-2015-12-05-6726825d.pth"):  # the other mode's file
        inception_extractor("legacy_pytorch", weights)


def test_legacy_pytorch_weights_file_is_found_through_a_private_hub_folder(tmp_path, monkeypatch):
    """pytorch-fid's state dict (here: random weights of its architecture) under any name; torch's hub dir is kept."""
    import cleanfid.inception_pytorch as cip

    state = {}
    with monkeypatch.context() as m:  # build the architecture without its download, keep its random weights
        m.setattr(cip, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(nn.Module, "load_state_dict", lambda self, sd, *a, **k: state.update(self.state_dict()))
        cip.fid_inception_v3()
    torch.save(state, tmp_path / "fid-weights.pth")
    hub = torch.hub.get_dir()
    ex = inception_extractor("legacy_pytorch", str(tmp_path / "fid-weights.pth"))
    assert torch.hub.get_dir() == hub
    f = ex(torch.randint(0, 256, (2, 3, 16, 16)).float())
    assert f.shape == (2, 2048) and torch.isfinite(f).all()


def test_too_small_a_reference_is_named_as_the_reference():
    with pytest.raises(MetricsError, match="the reference has 3 feature rows.*more than 3 images"):
        precision_recall(blobs(3, 0), blobs(50, 1))
    with pytest.raises(MetricsError, match=r"precision / recall: 3 feature rows.*--keep > 3"):
        precision_recall(blobs(50, 0), blobs(3, 1))
    with pytest.raises(MetricsError, match="the reference has 1 feature row"):
        kid(blobs(1, 0), blobs(50, 1))


def test_images_the_extractor_cannot_take_are_named_before_any_sampling(tmp_path):
    from onestep.features import input_problem

    ex = digits_extractor(CLASSIFIER)
    assert ex.dim == 64 and input_problem(ex, (1, 8, 8)) is None and input_problem(ex, (3, 8, 8)) is None
    msg = input_problem(ex, (3, 16, 16), "this teacher makes")
    assert "digits features take 1x8x8 images; this teacher makes (3, 16, 16): use --features inception" == msg
    assert "2-channel" in input_problem(ex, (2, 8, 8))
    with pytest.raises(FeatureError, match="is a folder; pass the weights file itself"):
        inception_extractor("clean", str(tmp_path))


def test_reference_files_that_onestep_did_not_write_are_one_line_each(tmp_path):
    import json

    ex = digits_extractor(CLASSIFIER)
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "list.npz", mu=np.zeros(64), sigma=np.eye(64), meta=np.array(json.dumps(["a"])))
    np.savez(tmp_path / "dim.npz", mu=np.zeros(10), sigma=np.eye(10), meta=np.array(json.dumps(ex.meta)))
    np.savez(tmp_path / "cov.npz", mu=np.zeros(64), sigma=np.eye(10), meta=np.array(json.dumps(ex.meta)))
    np.savez(tmp_path / "cut.npz", mu=np.zeros(64), sigma=np.eye(64), meta=np.array(json.dumps(ex.meta)))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:100])
    for name, words in (("empty", "empty file"), ("list", "JSON list, not an object"), ("dim", "10-d statistics; the "
                        "digits features are 64-d"), ("cov", "do not fit together"), ("cut", "recompute")):
        with pytest.raises(ReferenceError, match=words):
            Reference.load(str(tmp_path / f"{name}.npz"), ex)

"""GNDM: group statistics, its reduction to DMD, external rewards (adaptive weights, shapes, CLIP), importance
sampling of few-step students, and the command line."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_distill
from hypothesis import given, settings
from hypothesis import strategies as st
from test_triad_methods import batch, make_triad

from onestep.errors import OnestepError
from onestep.methods import build_method
from onestep.rewards import CLIPScore, RewardError, RewardSet, build_reward, group_standardise

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = torch.arange(10)


# ---- rewards importable by path ("test_gndm:NAME"; tests/ is on sys.path under pytest) -------------------
def brightness(images, cond):
    return images.mean(dim=(1, 2, 3))


def brightness_x100(images, cond):
    return 100 * images.mean(dim=(1, 2, 3))


def darkness(images, cond):
    return -images.flatten(1)[:, :32].mean(1)


def wrong_shape(images, cond):
    return images.mean(dim=(2, 3))  # (B, 1), not (B,)


def gndm(triad, **options):
    m = build_method("gndm", **options)
    m.prepare(triad, None, (1, 8, 8), "cpu")
    m.setup(LABELS, list(range(10)), None)
    return m


def generator_grads(method, triad, b, seed=3):
    triad.raw("generator").zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, logs = method.generator_loss(triad, b)
    loss.backward()
    return [p.grad.clone() for p in triad.generator_parameters()], logs


def perturbed_triad(**kw):
    """A triad whose fake score differs from the teacher (at initialisation the DM direction is zero)."""
    triad = make_triad(**kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in triad.raw("fake_score").parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return triad


# ---- group statistics ----------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.floats(0.1, 1e3), st.integers(0, 10_000))
def test_advantages_are_zero_mean_unit_variance_within_each_group(group_size, groups, scale, seed):
    r = scale * torch.randn(groups * group_size, generator=torch.Generator().manual_seed(seed))
    a = group_standardise(r, group_size, eps=1e-6).view(groups, group_size).double()
    g = r.view(groups, group_size).double()
    std = g.std(1, unbiased=False)
    # float32 centring loses a few ulps of the rewards' magnitude (rewards of ~700 that differ by ~0.03 occur):
    # relative to the group's spread, that is the error allowed
    tol = 1e-5 + 8 * torch.finfo(torch.float32).eps * g.abs().amax(1) / (std + 1e-6)
    assert ((a.mean(1)).abs() <= tol).all()
    # unit variance up to eps: a group whose rewards nearly agree (std ~1e-3) gets (std / (std + eps))^2 < 1
    assert ((a.var(1, unbiased=False) - (std / (std + 1e-6)) ** 2).abs() <= 2 * tol).all()
    assert torch.equal(group_standardise(r, 1), torch.zeros_like(r))  # a group of one has no advantage


def test_method_advantages_combine_rewards_and_stay_standardised():
    triad = perturbed_triad()
    m = gndm(triad, group_size=4, rewards=["test_gndm:brightness", "test_gndm:darkness"], reward_weights=[1, 0.5])
    b = batch(8)
    _, logs = m.generator_loss(triad, b)
    assert abs(logs["adv_group_std"] - 1) < 1e-3 and logs["adv_weight_max"] > 1 > logs["adv_weight_min"] > 0
    for key in ("reward_dm_mean", "reward_test_gndm.brightness_mean", "reward_test_gndm.darkness_weight", "loss_dm"):
        assert key in logs
    c = b["cond"]  # G consecutive samples share a condition, and the critic turn trains on them
    assert torch.equal(c, c[::4].repeat_interleave(4)) and b["generated"].shape == (8, 1, 8, 8)


# ---- reduction to DMD ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,gan,timesteps", [({}, False, None), ({"real_guidance_scale": 2.0}, False, None),
                                                   ({"gan_generator_weight": 0.1}, True, None),
                                                   ({"gan_generator_weight": 0.1, "gan_start": 5}, True, None),
                                                   ({}, False, [999, 499])])
def test_group_size_one_without_rewards_is_dmds_update(options, gan, timesteps):
    triad = perturbed_triad(gan=gan, timesteps=timesteps)
    b = batch(6)
    ref, ref_logs = generator_grads(build_method("dmd", **options), triad, dict(b))
    for advantage in ("elbo", "dm_norm", "none"):
        got, logs = generator_grads(gndm(triad, group_size=1, advantage=advantage, **options), triad, dict(b))
        assert all(torch.equal(a, g) for a, g in zip(ref, got)), advantage
        assert logs["loss_dm"] == ref_logs["loss_dm"] and logs["adv_weight_max"] == logs["adv_weight_min"] == 1.0
    assert any(g.abs().sum() > 0 for g in ref)


def test_group_normaliser_is_the_group_mean_of_dmds_per_sample_normaliser():
    triad = perturbed_triad()
    x, c = torch.randn(8, 1, 8, 8), torch.tensor([1] * 4 + [2] * 4)
    out = {}
    for norm in ("sample", "group"):
        torch.manual_seed(0)
        out[norm] = build_method("gndm", group_size=4, normaliser=norm)._dm(triad, x, c)
    (g_s, _, per), (g_g, _, _) = out["sample"], out["group"]
    expected = per.view(2, 4).mean(1).repeat_interleave(4) / per  # g_sample / g_group = group mean / own
    ratio = g_s.flatten(1).norm(dim=1) / g_g.flatten(1).norm(dim=1)
    assert torch.allclose(ratio, expected, rtol=1e-4)


def test_higher_reward_gets_a_larger_share_of_the_dm_update():
    triad = perturbed_triad()
    m = gndm(triad, group_size=4, advantage="none", advantage_scale=1.0, rewards=["test_gndm:brightness"])
    x = torch.randn(4, 1, 8, 8) + torch.arange(4.0).view(4, 1, 1, 1)  # brightness increases along the group
    adv, _ = m._advantage(None, m._reward_set(x, torch.zeros(4, dtype=torch.long))[0], 4, "cpu")
    assert (adv.diff() > 0).all() and abs(adv.mean()) < 1e-5


# ---- adaptive weights, reward checks ---------------------------------------------------------------------
def test_adaptive_weights_cancel_a_reward_scaled_by_100():
    x = (torch.randn(16, 1, 8, 8) + torch.randn(16, 1, 1, 1)).requires_grad_()  # reward std ~1 >> reward_eps
    fns = {"b": brightness, "d": darkness}
    plain, scaled = RewardSet(fns), RewardSet({"b": brightness_x100, "d": darkness})
    for _ in range(3):  # running variance over a few batches
        s_plain, _ = plain(x, None, grad=True)
        s_scaled, logs = scaled(x, None, grad=True)
    assert logs["reward_b_weight"] == pytest.approx(plain.weight("b") / 100, rel=1e-2)
    assert torch.allclose(plain.advantage(s_plain, 4), scaled.advantage(s_scaled, 4), atol=1e-3)

    def grad_share(rs, scores):  # norm of the brightness part / the darkness part of the gradient term
        parts = [torch.autograd.grad(-rs.weight(k) * scores[k].mean(), x, retain_graph=True)[0].norm() for k in "bd"]
        return (parts[0] / parts[1]).item()

    assert grad_share(scaled, s_scaled) == pytest.approx(grad_share(plain, s_plain), rel=1e-2)
    assert scaled.gradient_term(s_scaled) is not None


def test_wrong_reward_output_shape_is_refused_clearly():
    triad = make_triad()
    with pytest.raises(RewardError, match=r"reward 'test_gndm.wrong_shape': returned scores of shape \(2, 1\) for 2 "
                                          r"images; a reward returns one score per image, shape \(2,\)"):
        gndm(triad, rewards=["test_gndm:wrong_shape"])  # checked in setup, before training


def test_a_reward_that_raises_on_the_test_batch_is_refused_in_one_line():
    with pytest.raises(RewardError, match=r"reward 'os.path.join' failed on a test batch of 2 blank images "
                                          r"\(TypeError: .*one score per image$"):
        gndm(make_triad(), rewards=["os.path:join"])


@pytest.mark.parametrize("spec,message", [("nope", "not one of classifier, clip or an import path"),
                                          ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
                                          ("test_gndm:missing", "has no attribute 'missing'")])
def test_bad_reward_specs_are_refused(spec, message):
    with pytest.raises(RewardError, match=message):
        build_method("gndm", rewards=[spec])


def test_classifier_reward_is_the_probability_of_the_requested_class():
    from onestep.fid import DigitsClassifier

    torch.manual_seed(0)
    clf = DigitsClassifier()
    reward = build_reward("classifier", classifier=clf, cond_table=LABELS, keys=list(range(10)))
    x, c = torch.rand(5, 1, 8, 8, requires_grad=True), torch.tensor([0, 3, 3, 9, 1])
    s = reward(x, c)
    assert torch.allclose(s, clf(x).softmax(-1)[torch.arange(5), c])
    s.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in clf.parameters())
    with pytest.raises(RewardError, match="needs the digits classifier"):
        build_reward("classifier", classifier=None, cond_table=LABELS, keys=list(range(10)))


def tiny_clip(path):
    from test_sd import tiny_tokenizer
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32,
                num_attention_heads=2, num_hidden_layers=1, vocab_size=514, max_position_embeddings=16)
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=16,
                  patch_size=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_clip_reward_scores_images_against_their_conditions_text(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    path = tiny_clip(tmp_path / "clip")
    reward = build_reward("clip", cond_table=LABELS, keys=list(range(10)), sample_shape=(1, 8, 8), clip_model=path,
                          clip_prompt="digit {}")
    x, c = (torch.rand(3, 1, 8, 8) * 2 - 1).requires_grad_(), torch.tensor([3, 7, 3])
    s = reward(x, c)
    s.sum().backward()
    assert s.shape == (3,) and x.grad.abs().sum() > 0  # differentiable: usable as a gradient term
    model, tok = CLIPModel.from_pretrained(path).eval(), CLIPTokenizer.from_pretrained(path)
    t = CLIPScore._features(model.get_text_features(**tok(["digit 7"], return_tensors="pt")))
    img = torch.nn.functional.interpolate(((x[1:2].detach() + 1) / 2).expand(-1, 3, -1, -1), size=16, mode="bicubic")
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    i = CLIPScore._features(model.get_image_features(pixel_values=(img - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)))
    assert s[1].item() == pytest.approx(100 * torch.cosine_similarity(i, t).item(), abs=1e-3)
    with pytest.raises(RewardError, match="reward 'clip': no CLIP model .* nothing is downloaded"):
        build_reward("clip", cond_table=LABELS, keys=list(range(10)), sample_shape=(1, 8, 8),
                     clip_model=str(tmp_path / "absent"))
    with pytest.raises(RewardError, match="not grey or RGB images"):
        build_reward("clip", cond_table=LABELS, keys=list(range(10)), sample_shape=(4, 8, 8), clip_model=path)


# ---- importance sampling ---------------------------------------------------------------------------------
def test_rollouts_are_reused_with_gaussian_likelihood_ratios():
    triad = perturbed_triad(timesteps=[999, 499])
    m = gndm(triad, group_size=4, reuse=3, pg_weight=1.0, rewards=["test_gndm:brightness"])
    opt = torch.optim.SGD(triad.generator_parameters(), lr=1e-3)
    uses, ratios = [], []
    for _ in range(4):
        torch.manual_seed(len(uses))
        loss, logs = m.generator_loss(triad, batch(8))
        if logs["rollout_use"] == 2:  # the ratio of one transition is the Gaussian density ratio, recomputed here
            roll, sched = m._roll, triad.raw("generator").schedule
            a, s = sched.alpha_sigma(torch.tensor([499]))
            with torch.no_grad():
                new = triad.generator(roll["xs"][0], 999, roll["cond"])
            dist = lambda mu: torch.distributions.Normal(a * mu, s).log_prob(roll["xs"][1]).sum((1, 2, 3))  # noqa: E731
            assert torch.allclose((dist(new) - dist(roll["x0"][0])).exp().mean(), torch.tensor(logs["is_ratio_mean"]),
                                  rtol=1e-3)
        uses.append(logs["rollout_use"])
        ratios.append(logs["is_ratio_mean"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert uses == [1, 2, 3, 1]
    assert ratios[0] == pytest.approx(1.0, abs=1e-4) and ratios[1] != pytest.approx(1.0, abs=1e-6)


def test_ppo_term_makes_high_advantage_chains_more_likely():
    triad = make_triad(timesteps=[999, 499])  # fake score = teacher: the DM term is zero, only the PPO term acts
    m = gndm(triad, group_size=4, reuse=2, pg_weight=1.0, advantage="none", rewards=["test_gndm:brightness"])
    opt = torch.optim.SGD(triad.generator_parameters(), lr=1e-3)
    loss, _ = m.generator_loss(triad, batch(8))
    opt.zero_grad()
    loss.backward()
    opt.step()
    roll, sched = m._roll, triad.raw("generator").schedule
    a, s = sched.alpha_sigma(torch.tensor([499]))
    with torch.no_grad():
        new = triad.generator(roll["xs"][0], 999, roll["cond"])
    log_ratio = (-(roll["xs"][1] - a * new).square() + (roll["xs"][1] - a * roll["x0"][0]).square()).sum((1, 2, 3))
    assert torch.corrcoef(torch.stack([log_ratio / (2 * s**2), roll["adv"]]))[0, 1] > 0.5


# ---- options and the command line -------------------------------------------------------------------------
@pytest.mark.parametrize("options,message", [({"group_size": 0}, "group_size and reuse must be >= 1"),
                                             ({"advantage": "kl"}, "advantage: 'kl' is not one of"),
                                             ({"regression_weight": 0.25}, "no DMD1 regression loss"),
                                             ({"clip_range": 1.5}, "clip_range")])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_method("gndm", **options)


def test_group_size_must_divide_the_batch_and_reuse_needs_a_few_step_student():
    with pytest.raises(OnestepError, match="group_size: 4 does not divide the 6 samples"):
        gndm(make_triad(), group_size=4).generator_loss(make_triad(), batch(6))
    for key, value in (("reuse", 2), ("pg_weight", 1.0)):
        with pytest.raises(OnestepError, match=f"{key}: {value} acts through the likelihood ratios"):
            gndm(make_triad(), **{key: value})


def test_cli_refuses_a_wrong_shape_reward_with_one_line(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), "--preset", "digits-gndm", "--rewards",
           "test_gndm:wrong_shape", "--output_dir", str(tmp_path), "--cpu_threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(ROOT, "tests")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "returned scores of shape (2, 1)" in lines[0], r.stderr[-2000:]


@pytest.mark.slow
def test_short_digits_run_with_the_classifier_reward(tmp_path):
    r = run_distill(["--preset", "digits-gndm", "--rewards", "classifier", "--reward_gradient_weight", "0.1",
                     "--steps", "6", "--batch_size", "16", "--eval_samples", "100", "--teacher_eval_steps", "1",
                     "--sample_every", "0", "--checkpoint_every", "0", "--log_every", "3", "--cpu_threads", "1",
                     "--output_dir", str(tmp_path), "--name", "g"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert m["method"] == "gndm" and m["student"]["fid"] > 0
    g = m["gndm"]
    assert g["group_size"] == 4 and g["rewards"] == ["classifier"] and 0 < g["class_confidence"] <= 1
    assert {"reuse", "pg_weight", "normaliser", "advantage_scale", "reward_weights", "clip_range"} <= set(g)

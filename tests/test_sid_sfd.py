"""SiD and Score Forgetting Distillation: where gradients go, SFD's reduction to SiD, forget/override checks,
and a short real digits run that forgets a class."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_distill
from test_triad_methods import grads_of, make_triad, snapshot

from onestep.config import ConfigError, load_config, method_kwargs
from onestep.errors import OnestepError
from onestep.methods import build_method
from onestep.methods.sid import sid_loss

CLASSIFIER = os.path.join(ROOT, "assets", "digits-classifier")

DIGITS_TEACHER = os.path.join(ROOT, "assets", "digits-teacher")
DIGITS_CLASSIFIER = os.path.join(ROOT, "assets", "digits-classifier")


def labelled_batch(labels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"z": torch.randn(len(labels), 1, 8, 8, generator=g), "cond": torch.tensor(labels), "step": 0}


def perturb_fake_score(triad, scale=0.05):
    """Move the fake score away from the teacher (at initialisation they are equal and SiD's gradient is zero)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in triad.raw("fake_score").parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_sid_loss_gradient_with_fixed_scores():
    # with f_T, f_F constant: dL/dx = -(f_T - f_F) / w per pixel (w = mean|x - f_T| is stop-gradient)
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    f_t, f_f = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    sid_loss(x, f_t, f_f, alpha=1.2).sum().backward()
    w = (x.detach() - f_t).abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    assert torch.allclose(x.grad, -(f_t - f_f) / w, rtol=1e-5, atol=1e-6)
    # the value: sum_pix (f_T - f_F)((f_T - x) - alpha (f_T - f_F)) / w
    d = f_t - f_f
    expected = (d * ((f_t - x.detach()) - 1.2 * d)).sum(dim=(1, 2, 3)) / w.flatten()
    assert torch.allclose(sid_loss(x.detach(), f_t, f_f, 1.2), expected, rtol=1e-5)


def test_sid_gradient_reaches_generator_through_both_score_networks_and_only_the_generator_changes():
    triad = make_triad()
    perturb_fake_score(triad)
    method = build_method("sid")
    through = {}
    for role in ("teacher", "fake_score"):
        backbone = triad.teacher.backbone if role == "teacher" else triad.raw("fake_score").backbone
        backbone.register_full_backward_hook(
            lambda m, gin, gout, role=role: through.__setitem__(role, gin[0] is not None and gin[0].abs().sum() > 0))
    before = {r: snapshot(triad.raw(r)) for r in ("generator", "fake_score", "teacher")}
    opt = torch.optim.Adam(triad.generator_parameters(), lr=1e-3, betas=(0.0, 0.999))
    loss, logs = method.generator_loss(triad, labelled_batch([0, 1, 2, 3]))
    loss.backward()
    assert through == {"teacher": True, "fake_score": True}, "the gradient did not pass through both score networks"
    assert grads_of(triad.raw("generator"))
    assert all(p.grad is None for p in triad.raw("fake_score").parameters())
    assert all(p.grad is None for p in triad.teacher.parameters())
    assert all(p.requires_grad for p in triad.raw("fake_score").parameters())  # unfrozen again after the turn
    opt.step()
    after = {r: snapshot(triad.raw(r)) for r in ("generator", "fake_score", "teacher")}
    assert any(not torch.equal(before["generator"][k], v) for k, v in after["generator"].items())
    for role in ("fake_score", "teacher"):
        assert all(torch.equal(before[role][k], v) for k, v in after[role].items()), f"{role} changed"


def test_sid_fake_turn_trains_only_the_fake_score():
    triad = make_triad()
    loss, logs = build_method("sid").fake_score_loss(triad, labelled_batch([4, 5, 6]))
    loss.backward()
    assert grads_of(triad.raw("fake_score")) and not grads_of(triad.raw("generator"))
    assert all(p.grad is None for p in triad.teacher.parameters()) and "loss_fake" in logs


def train(method, triad, batches, seed=0):
    """SiD's schedule: per iteration a fake-score step, then a generator step; a fixed seed per turn."""
    opt_f = torch.optim.Adam(triad.critic_parameters(), lr=1e-3, betas=(0.0, 0.999))
    opt_g = torch.optim.Adam(triad.generator_parameters(), lr=1e-3, betas=(0.0, 0.999))
    for step, batch in enumerate(batches):
        for k, (fn, opt) in enumerate(((method.fake_score_loss, opt_f), (method.generator_loss, opt_g))):
            torch.manual_seed(seed + 10 * step + k)
            opt.zero_grad()
            fn(triad, batch)[0].backward()
            opt.step()
    return {r: snapshot(triad.raw(r)) for r in ("generator", "fake_score")}


def test_sfd_with_zero_forget_coefficients_equals_sid_step_for_step():
    remaining_batches = [labelled_batch([0, 1, 2, 4, 5, 9], seed=s) for s in range(3)]
    sid = train(build_method("sid"), make_triad(), remaining_batches)
    sfd = build_method("sfd", forget=[3], override=[8], fake_forget_coef=0.0, gen_forget_coef=0.0)
    sfd.setup(torch.arange(10), list(range(10)))
    same = train(sfd, make_triad(), remaining_batches)
    for role in ("generator", "fake_score"):
        assert all(torch.equal(sid[role][k], v) for k, v in same[role].items()), role
    # ... and the forget term, once on, does change the training (batches with forget-class samples)
    mixed = [labelled_batch([3, 1, 3, 4, 3, 9], seed=s) for s in range(3)]
    on = build_method("sfd", forget=[3], override=[8], fake_forget_coef=1.0, gen_forget_coef=1.0)
    off = build_method("sfd", forget=[3], override=[8], fake_forget_coef=0.0, gen_forget_coef=0.0)
    for m in (on, off):
        m.setup(torch.arange(10), list(range(10)))
    a, b = train(on, make_triad(), mixed), train(off, make_triad(), mixed)
    assert any(not torch.equal(a["generator"][k], v) for k, v in b["generator"].items())
    # with the forget coefficients 0, forget-class samples train nothing: class 3's embedding row is untouched
    emb = "denoiser.backbone.class_embedding.weight"
    assert torch.equal(b["generator"][emb][3], snapshot(make_triad().raw("generator"))[emb][3])
    assert not torch.equal(a["generator"][emb][3], b["generator"][emb][3])


def test_forget_terms_query_the_teacher_at_the_override_class():
    triad, seen = make_triad(), []
    perturb_fake_score(triad)
    triad.teacher.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].clone()),
                                                     with_kwargs=True)
    sfd = build_method("sfd", forget=[3, 5], override=[8, 0], gen_forget_coef=1.0)
    sfd.setup(torch.arange(10), list(range(10)))
    sfd.generator_loss(triad, labelled_batch([3, 1, 5, 3]))
    assert seen[-1].tolist() == [8, 1, 0, 8]
    rnd = build_method("sfd", forget=[3], override_mode="random", gen_forget_coef=1.0)
    rnd.setup(torch.arange(10), list(range(10)))
    rnd.generator_loss(triad, labelled_batch([3] * 64 + [1]))
    assert 3 not in seen[-1].tolist() and len(set(seen[-1][:64].tolist())) > 3 and seen[-1][64] == 1


def test_classifier_override_is_the_pseudo_label_of_a_remaining_class():
    from onestep.data import load_digits
    from onestep.fid import DigitsClassifier

    clf = DigitsClassifier.from_pretrained(DIGITS_CLASSIFIER).eval()
    sfd = build_method("sfd", forget=[3], override_mode="classifier")
    sfd.setup(torch.arange(10), list(range(10)), clf)
    x, y = load_digits("test")
    pick = torch.cat([torch.nonzero(y == c)[:4, 0] for c in (3, 5, 7)])
    c = torch.full((len(pick),), 3)
    new = sfd.override_cond(c, torch.ones(len(pick), dtype=torch.bool), x[pick])
    assert 3 not in new.tolist()
    assert (new[4:] == y[pick][4:]).float().mean() >= 0.75  # real 5s and 7s are mostly recognised as such


def test_text_conditions_map_forget_prompts_to_override_prompts():
    prompts = ["a cat", "a celebrity", "a middle aged man", "a dog"]
    table = torch.randn(len(prompts), 5, 6)  # (N, L, D) prompt embeddings
    sfd = build_method("sfd", forget=["a celebrity"], override=["a middle aged man"])
    sfd.setup(table, prompts)
    c = table[torch.tensor([1, 0, 1, 3])]
    forget = sfd.is_forget(c)
    assert forget.tolist() == [True, False, True, False]
    out = sfd.override_cond(c, forget, None)
    assert torch.equal(out[0], table[2]) and torch.equal(out[2], table[2]) and torch.equal(out[1], table[0])
    with pytest.raises(OnestepError, match="not one of this run's prompt"):
        build_method("sfd", forget=["a unicorn"], override=["a cat"]).setup(table, prompts)


def test_sd_teacher_grades_forget_prompts_at_their_override_prompt(tmp_path):
    from test_sd import PROMPTS, save_tiny_sd

    from onestep.loading import load_teacher
    from onestep.triad import Triad

    teacher = load_teacher(save_tiny_sd(str(tmp_path / "sd")), prompts=PROMPTS)
    triad = Triad.from_teacher(teacher.denoiser, fake_score="copy", sample_shape=teacher.sample_shape)
    perturb_fake_score(triad)
    seen = []
    teacher.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()),
                                               with_kwargs=True)
    sfd = build_method("sfd", forget=[PROMPTS[0]], override=[PROMPTS[2]], gen_forget_coef=1.0)
    sfd.setup(teacher.prompt_embeds, teacher.prompts)
    emb = teacher.prompt_embeds
    batch = {"z": torch.randn(3, *teacher.sample_shape), "cond": emb[torch.tensor([0, 1, 0])], "step": 0}
    loss, logs = sfd.generator_loss(triad, batch)
    loss.backward()
    assert [torch.equal(seen[-1][i], emb[j]) for i, j in enumerate((2, 1, 2))] == [True] * 3
    assert grads_of(triad.raw("generator")) and "loss_sid_forget" in logs


@pytest.mark.parametrize("options,message", [
    ({"forget": [3], "override": [3]}, "mapped to itself"),
    ({"forget": [3, 5], "override": [5]}, "is itself a forget class"),
    ({"forget": []}, "name the classes"),
    ({"forget": [3], "override": [1, 2]}, "one override per forget entry"),
    ({"forget": [3], "override_mode": "nope"}, "override_mode must be one of"),
    ({"forget": [3], "gen_forget_coef": -1.0}, "must be >= 0"),
])
def test_bad_forget_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_method("sfd", **options)


def test_sid_karras_grid_draws_sids_noise_levels_on_a_vp_teacher():
    triad = make_triad()
    sched = triad.teacher.schedule
    torch.manual_seed(0)
    uniform = build_method("sid").generator_t(sched, 4000, "cpu")
    karras = build_method("sid", t_grid="karras").generator_t(sched, 4000, "cpu")
    fake = build_method("sid", t_grid="karras").fake_timesteps(sched, 4000, "cpu")  # VP: the generator's grid
    for t in (uniform, karras, fake):
        assert t.dtype == torch.long and t.min() >= 0
    a, s = sched.alpha_sigma(karras)
    assert (s / a).max() <= 24.5 and (s / a).median() < 1.6  # SiD's EDM grid: sigma <= 24.4, median ~1
    assert uniform.float().median() > 350 and karras.float().median() < 300
    with pytest.raises(ValueError, match="t_grid must be one of"):
        build_method("sid", t_grid="log")


def test_forget_equal_to_override_is_one_line_error_exit_2(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), "--method", "sfd", "--forget", "3",
           "--override", "3", "--output_dir", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: override: forget class 3")


def test_cli_parses_forget_lists_and_another_method_leaves_the_presets_method_options():
    cfg = load_config(["--method", "sfd", "--forget", "3,5", "--override", "8"])
    m = build_method(cfg.method, **method_kwargs(cfg))
    assert m.forget == [3, 5] and m.override == [8] and m.update_ratio == 1  # not the digits preset's DMD2 ratio 3
    assert load_config(["--preset", "digits"]).method_args["update_ratio"] == 3  # the preset's own method keeps them
    sid = load_config(["--preset", "digits-sid"])
    assert sid.method == "sid" and sid.adam_beta1 == 0.0 and sid.generator_timesteps == [300]
    assert sid.lr_scheduler == "cosine" and sid.clip_sample == 1.0 and sid.batch_size == 128
    assert sid.steps == 3000 and build_method(sid.method, **method_kwargs(sid)).t_max == 0.5
    sfd = load_config(["--preset", "digits-sid", "--method", "sfd", "--forget", "3"])
    assert build_method(sfd.method, **method_kwargs(sfd)).t_max == 0.8  # another method: SiD's own default
    with pytest.raises(ConfigError, match="fake_t must be one of"):
        load_config(["--method", "sid", "--fake_t", "sometimes"])
    # SiD's Adam betas (0, 0.999) wherever nothing else sets beta1: the default preset, another preset, not DMD2
    assert load_config(["--method", "sid"]).adam_beta1 == 0.0 == load_config(["--method", "sfd", "--forget", "3"]).adam_beta1
    assert load_config(["--preset", "cifar10", "--method", "sid"]).adam_beta1 == 0.0
    assert load_config(["--method", "sid", "--adam_beta1", "0.5"]).adam_beta1 == 0.5  # the command line's value
    assert load_config(["--method", "dmd2"]).adam_beta1 == 0.9


@pytest.mark.parametrize("method", ["sid", "sfd"])
@pytest.mark.parametrize("noise", ["fresh", "shared"])
def test_generator_turn_draws_its_own_noise_unless_shared(method, noise):
    """SiD's release grades the generator on a fresh draw, not on the samples the fake score's step (first in the
    iteration) just trained on; generator_noise shared reuses the batch's."""
    triad, calls = make_triad(), []
    generate = triad.generate
    triad.generate = lambda z, c=None: calls.append(z.clone()) or generate(z, c)
    extra = {"forget": [3], "override": [1]} if method == "sfd" else {}
    m = build_method(method, generator_noise=noise, **extra)
    if method == "sfd":
        m.setup(torch.arange(10), list(range(10)))
    batch = labelled_batch([0, 3, 5, 7])
    m.fake_score_loss(triad, batch)
    m.generator_loss(triad, batch)
    assert torch.equal(calls[0], batch["z"]) and torch.equal(calls[1], batch["z"]) == (noise == "shared")


@pytest.mark.slow
def test_short_digits_run_lowers_forget_class_accuracy(tmp_path):
    from onestep.fid import DigitsClassifier
    from onestep.forgetting import forget_class_figures
    from onestep.generator import Generator
    from onestep.loading import load_teacher

    # the student starts as the teacher evaluated once at t=300: how often is its class-3 output a 3?
    clf = DigitsClassifier.from_pretrained(DIGITS_CLASSIFIER).eval()
    start = Generator(load_teacher(DIGITS_TEACHER).denoiser, [300])
    before = forget_class_figures(start.sample, clf, [3], 200, (1, 8, 8))["forget_class_accuracy"]
    r = run_distill(["--preset", "digits-sid", "--method", "sfd", "--forget", "3", "--override", "8",
                     "--gen_forget_coef", "1", "--fake_forget_coef", "1", "--steps", "40", "--batch_size", "32",
                     "--lr_generator", "1e-3", "--lr_scheduler", "constant", "--eval_samples", "200", "--teacher_eval_steps", "1",
                     "--sample_every", "0", "--checkpoint_every", "0", "--cpu_threads", "1",
                     "--output_dir", str(tmp_path), "--name", "sfd"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "note: method sfd starts from its own option defaults, not from t_max 0.5 (preset 'digits-sid' for sid)" in r.stderr
    m = json.loads((tmp_path / "sfd" / "metrics.json").read_text())
    f = m["forgetting"]
    assert f["forget"] == [3] and f["override"] == [8] and f["remaining"] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert before > 0.8 and f["forget_class_accuracy"] < before - 0.3, (before, f)
    assert f["remaining_class_accuracy"] > 0.8 and f["remaining_fid"] > 0
    card = (tmp_path / "sfd" / "pipeline" / "README.md").read_text()
    assert "Forgotten conditions:** [3]" in card and f"{f['unlearning_accuracy']:.4g}" in card


@pytest.mark.slow
def test_sid_starts_its_generator_at_sigma_2_5_on_an_edm_teacher(tmp_path):
    """METHODS.md: sigma_init 80 for DMD2, 2.5 for SiD. Through the CLI, on a tiny EDM teacher folder, the exported
    students' one step sits where each method starts."""
    from conftest import tiny_unet
    from diffusers import EDMEulerScheduler

    teacher = tmp_path / "edm-teacher"
    tiny_unet(None).save_pretrained(teacher / "unet")
    EDMEulerScheduler().save_pretrained(teacher / "scheduler")
    from onestep.methods import default_generator_timesteps
    from onestep.schedule import Schedule

    edm = Schedule.from_scheduler(EDMEulerScheduler())
    assert default_generator_timesteps(build_method("sfd", forget=[3]), edm) == [2.5]  # SFD is SiD's generator
    vp = Schedule("vp", alphas_cumprod=torch.linspace(0.99, 0.01, 1000))
    assert default_generator_timesteps(build_method("sid"), vp) == []  # VP: the top (t = 999)
    expect = {"sid": [2.5], "dmd2": [80.0]}
    for method in expect:  # dmd2 with the digits-FID: the EDM teacher's own FID samples it with EDMEulerScheduler
        r = run_distill(["--preset", "smoke", "--teacher", str(teacher), "--method", method, "--steps", "1",
                         "--classifier", "" if method == "sid" else CLASSIFIER, "--output_dir", str(tmp_path),
                         "--name", method])
        assert r.returncode == 0, r.stderr[-2000:]
        timesteps = json.loads((tmp_path / method / "pipeline" / "model_index.json").read_text())["timesteps"]
        assert timesteps == expect[method], (method, timesteps)
    teacher_fid = json.loads((tmp_path / "dmd2" / "metrics.json").read_text())["teacher"]
    assert teacher_fid["nfe"] == 4 and teacher_fid["fid"] > 0, teacher_fid

"""Behaviour of the triad and DMD/DMD2: which networks gradients reach, what never changes."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

from onestep.denoiser import Denoiser
from onestep.methods import build_method
from onestep.methods.dmd import dm_gradient, dm_surrogate
from onestep.schedule import Schedule
from onestep.triad import Triad


def make_triad(fake_score="copy", gan=False, timesteps=None, source="fake_score", ema=None, generator_lora=0):
    sched = Schedule.from_scheduler_config(dict(DDPMScheduler().config))
    teacher = Denoiser(tiny_unet(), sched, null_cond=10)
    return Triad.from_teacher(teacher, fake_score=fake_score, lora_rank=4, gan_head=gan, sample_shape=(1, 8, 8),
                              example_cond=torch.tensor([0]), generator_timesteps=timesteps, gan_feature_source=source,
                              ema_decay=ema, generator_lora_rank=generator_lora)


def batch(n=4):
    torch.manual_seed(1)
    return {"z": torch.randn(n, 1, 8, 8), "cond": torch.randint(0, 10, (n,)),
            "real": torch.rand(n, 1, 8, 8) * 2 - 1, "real_cond": torch.randint(0, 10, (n,))}


def grads_of(module):
    return [p.grad for p in module.parameters() if p.grad is not None and p.grad.abs().sum() > 0]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_dm_gradient_points_from_fake_to_teacher():
    x = torch.zeros(2, 1, 2, 2, requires_grad=True)
    x0_real, x0_fake = torch.ones(2, 1, 2, 2), -torch.ones(2, 1, 2, 2)
    grad = dm_gradient(x.detach(), x0_real, x0_fake)
    assert torch.allclose(grad, torch.full_like(grad, -2.0))  # (fake - real) / mean|x - real| = -2 / 1
    dm_surrogate(x, grad).backward()
    # descent (x - lr * x.grad) moves x toward the teacher's x0 (+1), away from the fake's (-1)
    assert (x.grad < 0).all()
    assert torch.allclose(x.grad, grad / x.numel())


def test_dm_gradient_replaces_non_finite():
    g = dm_gradient(torch.zeros(1, 1, 1, 2), torch.tensor([[[[0.0, float("nan")]]]]), torch.ones(1, 1, 1, 2))
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("fake_score,gan,source,generator_lora", [
    ("copy", False, "fake_score", 0), ("copy", True, "fake_score", 0), ("lora", True, "fake_score", 0),
    ("copy", True, "teacher", 0), ("lora", True, "fake_score", 4), ("copy", False, "fake_score", 4)])
def test_gradients_reach_only_what_each_loss_trains(fake_score, gan, source, generator_lora):
    triad = make_triad(fake_score, gan, source=source, generator_lora=generator_lora)
    method = build_method("dmd2" if gan else "dmd", real_guidance_scale=2.0)
    teacher_before = snapshot(triad.teacher.backbone)
    loss, logs = method.generator_loss(triad, batch())
    loss.backward()
    assert grads_of(triad.raw("generator")), "generator got no gradient"
    reached = [n for n, p in triad.raw("generator").named_parameters() if p.grad is not None]
    assert not generator_lora or all(".lora_" in n and ".generator." in n for n in reached)  # its adapters only
    assert all(p.grad is None for p in triad.raw("fake_score").parameters())
    assert all(p.grad is None for p in triad.teacher.parameters())
    if gan:
        assert all(p.grad is None for p in triad.gan_head.parameters()) and "loss_gan_g" in logs
    triad.raw("generator").zero_grad(set_to_none=True)

    loss, logs = method.fake_score_loss(triad, batch())
    loss.backward()
    assert not grads_of(triad.raw("generator"))
    assert grads_of(triad.raw("fake_score"))
    assert all(p.grad is not None for p in triad.critic_parameters())  # (LoRA A is zero at B = 0, yet reached)
    if gan:
        assert grads_of(triad.gan_head) and "loss_gan_d" in logs
    teacher_params = [p for n, p in triad.teacher.backbone.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in teacher_params), "a teacher weight received a gradient"
    assert all(torch.equal(teacher_before[k], v) for k, v in snapshot(triad.teacher.backbone).items())


def test_teacher_never_changes_over_training_steps():
    triad = make_triad("lora", gan=True)
    method = build_method("dmd2")
    base = {k: v for k, v in snapshot(triad.teacher.backbone).items() if "lora_" not in k}
    opt_g = torch.optim.AdamW(triad.generator_parameters(), lr=1e-2)
    opt_f = torch.optim.AdamW(triad.critic_parameters(), lr=1e-2)
    x = torch.randn(2, 1, 8, 8)
    c = torch.tensor([1, 2])
    out_before = triad.teacher(x, torch.tensor([500, 500]), c)
    for step in range(3):
        for fn, opt in ((method.generator_loss, opt_g), (method.fake_score_loss, opt_f)):
            opt.zero_grad()
            fn(triad, batch())[0].backward()
            opt.step()
    after = snapshot(triad.teacher.backbone)
    assert all(torch.equal(base[k], after[k]) for k in base)
    assert torch.equal(out_before, triad.teacher(x, torch.tensor([500, 500]), c))  # adapters off: same teacher
    # ... while the LoRA fake score did move away from the teacher
    assert not torch.allclose(triad.fake_score(x, torch.tensor([500, 500]), c), out_before)


def test_lora_fake_score_shares_teacher_weights():
    triad = make_triad("lora")
    assert triad.raw("fake_score").backbone is triad.teacher.backbone  # one copy of the weights
    trainable = [n for n, p in triad.raw("fake_score").backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([100, 900]), torch.tensor([3, 4])
    assert torch.allclose(triad.fake_score(x, t, c), triad.teacher(x, t, c))  # LoRA starts at zero


def test_lora_generator_shares_teacher_weights_and_exports_them_merged():
    """A LoRA generator: new modules over the teacher's own weight tensors, its adapters the only trained weights
    (and all the EMA keeps); it starts as the teacher, and its export is the teacher's plain architecture with the
    adapters merged in, computing what the generator computes."""
    triad = make_triad("lora", ema=0.5, generator_lora=4)
    gen, teacher = triad.raw("generator"), triad.teacher.backbone
    backbone = gen.denoiser.backbone
    assert backbone is not teacher
    ours = {n: p for n, p in backbone.named_parameters() if "lora_" not in n}
    theirs = {n: p for n, p in teacher.named_parameters() if "lora_" not in n}
    assert ours.keys() == theirs.keys() and all(ours[n] is theirs[n] for n in ours)  # shared, not copied
    assert [n for n, p in gen.named_parameters() if p.requires_grad] == [
        n for n, p in gen.named_parameters() if ".lora_" in n and ".generator." in n]
    assert len(triad.ema.shadow_params) == len(triad.generator_parameters())
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([999, 999]), torch.tensor([3, 4])
    gen.eval()
    with torch.no_grad():
        start = triad.teacher(x, t, c)
        assert torch.allclose(gen(x, t, c), start)  # LoRA B = 0
        for p in triad.generator_parameters():
            p.normal_(0, 0.05)
        trained = gen(x, t, c)
        assert not torch.allclose(trained, start) and torch.equal(triad.teacher(x, t, c), start)
        merged = triad.export_generator(use_ema=False)
        assert set(merged.denoiser.backbone.state_dict()) == set(tiny_unet().state_dict())  # no peft layers left
        torch.testing.assert_close(merged(x, t, c), trained, rtol=1e-4, atol=1e-4)
        assert torch.allclose(triad.export_generator(use_ema=True)(x, t, c), start)  # the EMA has not stepped
        triad.ema_step()
        assert not torch.allclose(triad.export_generator(use_ema=True)(x, t, c), start)


@pytest.mark.parametrize("fake_score", ["copy", "lora"])
def test_lora_generator_under_mixed_precision_shares_the_cast_weights_and_leaves_a_full_fake_score_float32(fake_score):
    """With the teacher stored in bf16, the LoRA generator computes with the same (cast) tensors, and a full-copy fake
    score still starts from the teacher's float32 weights, as without a LoRA generator."""
    sched = Schedule.from_scheduler_config(dict(DDPMScheduler().config))
    unet = tiny_unet()
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    triad = Triad.from_teacher(Denoiser(unet, sched, null_cond=10), fake_score=fake_score, lora_rank=4,
                               frozen_dtype=torch.bfloat16, generator_lora_rank=4)
    def plain(net):  # (peft renames an adapted layer's weight to <layer>.base_layer.weight)
        return {n.replace(".base_layer", ""): p for n, p in net.named_parameters() if "lora_" not in n}

    shared, teacher = plain(triad.raw("generator").denoiser.backbone), plain(triad.teacher.backbone)
    assert shared.keys() == teacher.keys() and all(shared[n] is teacher[n] for n in shared)
    assert all(p.dtype == torch.bfloat16 for p in shared.values())
    assert all(p.dtype == torch.float32 for p in triad.generator_parameters())
    if fake_score == "copy":
        fake = triad.raw("fake_score").backbone.state_dict()
        assert all(torch.equal(fake[k], original[k]) for k in original)


def test_guidance_is_one_batched_forward_and_matches_two_calls():
    triad = make_triad()
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 3])
    calls = []
    h = triad.teacher.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    g = triad.teacher.guided(x, t, c, 3.0)
    h.remove()
    assert calls == [6]
    x0_c, x0_u = triad.teacher(x, t, c), triad.teacher(x, t, torch.full_like(c, 10))
    tol = dict(rtol=1e-4, atol=1e-4 * g.abs().max().item())  # x0 from eps at t=990 amplifies float noise
    assert torch.allclose(g, x0_u + 3.0 * (x0_c - x0_u), **tol)
    per_sample = triad.teacher.guided(x, t, c, torch.tensor([1.0, 3.0, 3.0]))
    assert torch.allclose(per_sample[0], x0_c[0], **tol) and torch.allclose(per_sample[1:], g[1:], **tol)


def test_ema_follows_generator_steps_only():
    triad = make_triad(ema=0.5)
    gen = triad.raw("generator")
    ema_before = [p.clone() for p in triad.ema.shadow_params]
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(ema_before, triad.ema.shadow_params))  # no step, no change
    triad.ema_step()
    assert not all(torch.equal(a, b) for a, b in zip(ema_before, triad.ema.shadow_params))
    exported = triad.export_generator(use_ema=True)
    assert all(torch.equal(a, b) for a, b in zip(exported.parameters(), triad.ema.shadow_params))


def test_in_place_ema_equals_diffusers_ema_and_round_trips():
    """The in-place update is EMAModel's update (decay schedule included), and its state loads into EMAModel."""
    from diffusers.training_utils import EMAModel

    from onestep.triad import in_place_ema

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    net[1].bias.requires_grad_(False)  # frozen tensors are copied, as EMAModel does
    ours = in_place_ema(net.parameters(), 0.9)
    ref = EMAModel(net.parameters(), decay=0.9, foreach=True, use_ema_warmup=False)
    ref_warm = EMAModel(net.parameters(), decay=0.9, foreach=True, use_ema_warmup=True)
    ours_warm = in_place_ema(net.parameters(), 0.9)
    ours_warm.use_ema_warmup = True
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        for e in (ours, ref, ours_warm, ref_warm):
            e.step(net.parameters())
    for a, b in ((ours, ref), (ours_warm, ref_warm)):
        assert a.cur_decay_value == b.cur_decay_value
        for x, y in zip(a.shadow_params, b.shadow_params):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours.shadow_params[0], ours_warm.shadow_params[0])
    assert torch.equal(ours.shadow_params[3], net[1].bias)
    loaded = EMAModel(net.parameters(), decay=0.5)
    loaded.load_state_dict(ours.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(loaded.shadow_params, ours.shadow_params))


def test_cast_module_keeps_fp32_modules_and_does_not_warn():
    """The frozen teacher's cast to the compute dtype: bf16 weights, a diffusers model's fp32 modules kept, and none of
    ModelMixin.to's warning (it warns on every dtype cast)."""
    import logging

    from diffusers.utils import logging as dlog

    from onestep.denoiser import cast_module

    unet = tiny_unet()
    unet._keep_in_fp32_modules = ["conv_in"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    dlog.get_logger("diffusers").addHandler(handler)
    try:
        tiny_unet().to(torch.bfloat16)  # diffusers' own cast warns (diffusers >= 0.37): what this check would see
        dlog.get_logger("diffusers.models.modeling_utils").warning("seen")  # the handler sees diffusers' warnings
        warned, records[:] = len(records), []
        cast_module(unet, torch.bfloat16)
    finally:
        dlog.get_logger("diffusers").removeHandler(handler)
    assert warned and records == []
    assert unet.conv_in.weight.dtype == torch.float32 and unet.conv_out.weight.dtype == torch.bfloat16


def test_few_step_generator_backward_simulation():
    triad = make_triad(timesteps=[999, 749, 499, 249])
    gen = triad.raw("generator")
    calls = []
    h = gen.denoiser.backbone.register_forward_hook(lambda m, i, o: calls.append(int(i[1][0])))
    x = triad.generate(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), k=2)
    h.remove()
    assert calls == [999, 749, 499] and x.requires_grad
    x.sum().backward()  # only the last call is graded; it still reaches the weights
    assert grads_of(gen)


def test_regression_pairs_come_from_the_teacher_ode():
    triad = make_triad()
    method = build_method("dmd", regression_weight=0.25, regression_pairs=8, regression_steps=3, regression_batch=4)
    from onestep.data import ConditionSampler

    method.prepare(triad, ConditionSampler(10), (1, 8, 8), "cpu", seed=0)
    z, c, y = method._pairs
    from onestep.sampling import sample_teacher

    ref = sample_teacher(triad.teacher, z[:2], c[:2], 3)
    assert torch.allclose(y[:2], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    loss, logs = method.generator_loss(triad, batch())
    assert "loss_reg" in logs and torch.isfinite(loss)


@pytest.mark.parametrize("t_frac", [0.0, 0.3])
def test_teacher_feature_distance_grades_the_generator_through_the_frozen_teacher(t_frac):
    """regression_distance "teacher": zero between equal images, the gradient reaches the generated images (and the
    generator) through the teacher, whose weights get no gradient and do not change."""
    from onestep.regression import regression_distance

    triad = make_triad()
    before = snapshot(triad.teacher)
    c = torch.tensor([1, 2, 3])
    y = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    assert regression_distance("teacher", triad, y.clone(), y, c, t_frac) == 0
    x = triad.generate(torch.randn(3, 1, 8, 8), c)
    d = regression_distance("teacher", triad, x, y, c, t_frac)
    assert d > 0 and d.requires_grad
    d.backward()
    assert grads_of(triad.raw("generator")) and not any(p.grad is not None for p in triad.teacher.parameters())
    assert all(torch.equal(v, snapshot(triad.teacher)[k]) for k, v in before.items())
    method = build_method("dmd", regression_weight=1.0, regression_pairs=8, regression_steps=2, regression_batch=4,
                          regression_distance="teacher", regression_feature_t=t_frac)
    from onestep.data import ConditionSampler

    method.prepare(triad, ConditionSampler(10), (1, 8, 8), "cpu", seed=0)
    loss, logs = method.generator_loss(triad, batch())
    assert logs["loss_reg"] > 0 and torch.isfinite(loss)
    for bad in ({"regression_distance": "lpips"}, {"regression_feature_t": 1.5}):
        with pytest.raises(ValueError, match="regression_distance must be one of mse, teacher"):
            build_method("dmd", **bad)


def test_unknown_method_and_option_refused():
    with pytest.raises(ValueError, match="unknown method"):
        build_method("nope")
    with pytest.raises(ValueError, match="no option"):
        build_method("dmd", not_an_option=1)


def test_gan_start_runs_dm_alone_then_dm_and_gan():
    """gan_start N: the first N iterations train by DM and denoising alone (the GAN head untouched), then both terms."""
    triad = make_triad(gan=True)
    method = build_method("dmd2", gan_start=2)
    head = triad.raw("gan_head")
    for step in range(3):
        b = {**batch(), "step": step}
        (g_loss, g_logs), (f_loss, f_logs) = method.generator_loss(triad, b), method.fake_score_loss(triad, b)
        head.zero_grad(set_to_none=True)
        f_loss.backward()
        assert ("loss_gan_g" in g_logs) == ("loss_gan_d" in f_logs) == bool(grads_of(head)) == (step >= 2), step


def test_gan_head_learns_to_separate_features():
    """A head over a 2x2 bottleneck and an 8x8 map learns a mean shift in the bottleneck features."""
    from onestep.gan import GANHead

    torch.manual_seed(0)
    shapes = [(64, 2), (32, 8)]
    head = GANHead(shapes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    shift = torch.zeros(1, 64, 1, 1)
    shift[:, :4] = 1.0  # Bayes-optimal accuracy 0.98

    def feats(n, real):
        out = [torch.randn(n, c, s, s) for c, s in shapes]
        out[0] = out[0] + (shift if real else 0)
        return out

    for _ in range(150):
        logits_real, logits_fake = head(feats(32, True)), head(feats(32, False))
        loss = torch.nn.functional.softplus(-logits_real).mean() + torch.nn.functional.softplus(logits_fake).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = ((head(feats(500, True)) > 0).float().mean() + (head(feats(500, False)) < 0).float().mean()) / 2
    assert acc > 0.9, f"discriminator accuracy {acc:.2f}"


def test_gan_layers_select_backbone_modules():
    triad = make_triad(gan=True)
    assert len(triad.gan_head.branches) == 1
    fake = triad.raw("fake_score")
    fake.feature_layers = ("down_blocks.0.resnets.0", "mid_block")
    _, feats = fake(torch.randn(2, 1, 8, 8), torch.tensor([500, 500]), torch.tensor([1, 2]), features=True)
    assert [f.shape[-1] for f in feats] == [8, 4]  # the tiny UNet: 8x8 first block, 4x4 bottleneck
    fake.feature_layers = ("no_such_block",)
    with pytest.raises(ValueError, match="no module 'no_such_block'"):
        fake(torch.randn(2, 1, 8, 8), torch.tensor([500, 500]), torch.tensor([1, 2]), features=True)


@pytest.mark.parametrize("layers", [("mid_block",), ("down_blocks.0.resnets.0", "mid_block")])
def test_features_only_stops_after_the_feature_layers(layers):
    """DMD2's classify mode: the same features as a full forward, and the decoder never runs; gradients reach
    only what the features depend on."""
    triad = make_triad(gan=True)
    fake = triad.raw("fake_score")
    fake.feature_layers = layers
    calls = []
    handle = fake.backbone.up_blocks[0].register_forward_hook(lambda *_: calls.append(1))
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3])
    _, full = fake(x, t, c, features=True)
    assert len(calls) == 1
    only = fake(x, t, c, features_only=True)
    assert len(calls) == 1 and len(only) == len(layers)
    assert all(torch.equal(a, b) for a, b in zip(full, only))
    sum(f.square().mean() for f in only).backward()
    decoder = [p.grad for p in fake.backbone.up_blocks.parameters()]
    encoder = [p.grad for p in fake.backbone.down_blocks[0].parameters()]
    assert all(g is None for g in decoder) and any(g is not None and g.abs().sum() > 0 for g in encoder)
    handle.remove()


def test_clip_sample_clamps_values_passes_gradients_and_exports(tmp_path):
    from onestep.pipeline import OneStepPipeline, export_pipeline

    sched = Schedule.from_scheduler_config(dict(DDPMScheduler().config))
    teacher = Denoiser(tiny_unet(), sched, null_cond=10)
    plain = Triad.from_teacher(teacher, generator_timesteps=[300])
    clipped = Triad.from_teacher(teacher, generator_timesteps=[300], clip_sample=0.5)
    z, c = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    x_plain = plain.generate(z, c)
    x = clipped.generate(z, c)
    assert x.abs().max() <= 0.5 and (x_plain.abs() > 0.5).any()  # the case has pixels past the bound
    assert torch.equal(x, x_plain.clamp(-0.5, 0.5))
    w = torch.randn_like(x)
    (x * w).sum().backward()
    (x_plain * w).sum().backward()  # straight through: the same gradient as without the clamp, pixels past it too
    for p, q in zip(clipped.generator_parameters(), plain.generator_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="clip_sample must be positive"):
        Triad.from_teacher(teacher, clip_sample=0.0)
    export_pipeline(clipped.export_generator(), dict(DDPMScheduler().config), str(tmp_path / "p"), num_classes=10,
                    null_class=10)
    pipe = OneStepPipeline.from_pretrained(str(tmp_path / "p"))
    assert pipe.config.clip_sample == 0.5 and pipe.student().clip_sample == 0.5
    out = pipe(class_labels=c.tolist(), latents=z, output_type="pt").images
    assert torch.allclose(out, (x.detach() + 1) / 2, atol=1e-5)  # the pipeline maps [-1, 1] to [0, 1]


@pytest.mark.parametrize("beta_schedule", ["sigmoid", "squaredcos_cap_v2"])
def test_stock_ddim_export_of_a_teacher_schedule_ddim_lacks(tmp_path, beta_schedule):
    """DDPM's "sigmoid" betas, which DDIMScheduler cannot build, go into the -ddim export written out; it reproduces
    the student (and a schedule DDIM has keeps its name)."""
    import numpy as np
    from diffusers import DDIMPipeline

    from onestep.generator import Generator
    from onestep.pipeline import OneStepPipeline, export_pipeline

    config = dict(DDPMScheduler(beta_schedule=beta_schedule).config)
    teacher = Denoiser(tiny_unet(None), Schedule.from_scheduler_config(config))
    written = export_pipeline(Generator(teacher, [999]), config, str(tmp_path / "p"))
    assert written == [str(tmp_path / "p"), str(tmp_path / "p-ddim")]
    ddim = DDIMPipeline.from_pretrained(written[1])
    assert (ddim.scheduler.config.trained_betas is None) == (beta_schedule != "sigmoid")
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = OneStepPipeline.from_pretrained(written[0])(batch_size=3, latents=z, output_type="np").images
    theirs = ddim(batch_size=3, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert np.abs(theirs - ours).max() < 1e-4


@pytest.mark.parametrize("kind", ["flow", "edm"])
def test_flow_and_edm_students_reload_with_their_own_schedule(tmp_path, kind):
    """An exported flow / EDM student loads with its own schedule, not a VP fallback, and reproduces its outputs."""
    from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

    from onestep.generator import Generator
    from onestep.pipeline import OneStepPipeline, export_pipeline

    scheduler = FlowMatchEulerDiscreteScheduler() if kind == "flow" else EDMEulerScheduler()
    config = {**scheduler.config, "_class_name": type(scheduler).__name__}
    sched = Schedule.from_scheduler_config(config)
    gen = Generator(Denoiser(tiny_unet(), sched, null_cond=10), [0.75] if kind == "flow" else [2.5])
    export_pipeline(gen, config, str(tmp_path / "p"), num_classes=10, null_class=10)
    pipe = OneStepPipeline.from_pretrained(str(tmp_path / "p"))
    assert pipe.student().schedule.kind == kind
    in_memory = OneStepPipeline(unet=gen.denoiser.backbone, scheduler=scheduler, timesteps=gen.timesteps)
    assert in_memory.student().schedule.kind == kind  # a scheduler built in memory: its config lacks _class_name
    z, c = torch.randn(4, 1, 8, 8), torch.arange(4)
    with torch.no_grad():
        x = gen.sample(z, c)
    out = pipe(class_labels=c.tolist(), latents=z, output_type="pt").images
    assert torch.allclose(out, ((x + 1) / 2).clamp(0, 1), atol=1e-5)


def test_the_pipeline_call_refuses_bad_arguments_in_one_message(tmp_path):
    """Labels that are not integers, none, the wrong latents or step counts: a ValueError saying what to pass (not a
    tensor error from deep inside); the same labels as a list, a tensor or one int work."""
    from onestep.pipeline import OneStepPipeline

    pipe = OneStepPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(), timesteps=[999], num_classes=10, null_class=10)
    for kwargs, words in (({"class_labels": []}, "class_labels is empty"), ({"class_labels": "3"}, "got the string"),
                          ({"class_labels": [1.7]}, "must be integers"), ({"class_labels": [True]}, "must be integers"),
                          ({"class_labels": [10]}, "must lie in 0..9"), ({"class_labels": [1], "latents": [[0.0]]},
                                                                          "latents must be a torch.Tensor"),
                          ({"class_labels": [1], "num_inference_steps": 0}, "must be in 1..1"),
                          ({"class_labels": [1], "num_inference_steps": 1.0}, "must be an integer"),
                          ({}, "pass class_labels")):
        with pytest.raises(ValueError, match=words):
            pipe(**kwargs)
    z = torch.randn(2, 1, 8, 8)
    outs = [pipe(class_labels=c, latents=z, output_type="pt").images for c in ([3, 3], torch.tensor([3, 3]))]
    assert torch.equal(outs[0], outs[1]) and pipe(class_labels=3, output_type="pt").images.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        OneStepPipeline(unet=tiny_unet(None), scheduler=DDPMScheduler(), timesteps=[999])(batch_size=0)


@pytest.mark.parametrize("method_name,fake_score,generator_lora", [
    ("dmd2", "copy", 0), ("dmd2", "lora", 0), ("sid", "copy", 0), ("sid", "lora", 0), ("dmd2", "lora", 4)])
def test_gradient_checkpointing_gives_the_same_gradients_through_a_frozen_critic(method_name, fake_score, generator_lora):
    """DMD2's GAN generator term and SiD run the fake score frozen (Triad.frozen) with gradients to its input; the
    backward, and so checkpointing's recomputation, comes after the freeze is lifted and (a LoRA fake score) after
    the teacher's call turned the shared backbone's adapters off."""
    from onestep.triad import enable_gradient_checkpointing

    def grads(checkpointing):
        triad = make_triad(fake_score, gan=method_name == "dmd2", generator_lora=generator_lora)
        torch.manual_seed(5)
        with torch.no_grad():  # LoRA B starts at 0: give the adapters an effect, so off and on differ in value
            for n, p in [*triad.raw("fake_score").backbone.named_parameters(),
                         *triad.raw("generator").named_parameters()]:
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        if checkpointing:
            enable_gradient_checkpointing([triad.raw("generator").denoiser.backbone, triad.raw("fake_score").backbone])
        method = build_method(method_name)
        out = {}
        for turn, loss_fn, params in (("generator", method.generator_loss, triad.generator_parameters()),
                                      ("critic", method.fake_score_loss, triad.critic_parameters())):
            torch.manual_seed(3)
            b = batch()
            if turn == "critic":
                b["generated"] = out["generated"]
            loss, _ = loss_fn(triad, b)
            loss.backward()
            out["generated"] = b.get("generated")
            out[turn] = [p.grad.clone() for p in params]
            assert all(p.requires_grad for p in params)  # the freeze lifted, also after the recomputations
        return out

    plain, ckpt = grads(False), grads(True)
    for turn in ("generator", "critic"):
        assert any(g.abs().sum() > 0 for g in plain[turn])
        for a, b in zip(plain[turn], ckpt[turn]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method_name,fake_score,checkpointing", [("dmd", "copy", False), ("dmd2", "lora", False),
                                                                  ("dmd2", "copy", True), ("dmd2", "lora", True)])
def test_shared_critic_pass_trains_the_critic_on_the_dm_forward(method_name, fake_score, checkpointing):
    """shared_critic_pass: the generator turn is unchanged; the critic turn makes one fake-score forward fewer and its
    gradient is that of its loss on a fresh forward at the generator turn's (x_t, t), although the graph it reuses
    lived through the generator's backward (and, LoRA, the teacher's calls that turn the adapters off)."""
    from onestep.triad import enable_gradient_checkpointing

    def run(shared, fresh=False):
        triad = make_triad(fake_score, gan=method_name == "dmd2")
        torch.manual_seed(5)
        with torch.no_grad():  # LoRA B starts at 0: give the adapters an effect
            for n, p in triad.raw("fake_score").backbone.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        if checkpointing:
            enable_gradient_checkpointing([triad.raw("generator").denoiser.backbone, triad.raw("fake_score").backbone])
        calls = []
        triad.raw("fake_score").register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
        method = build_method(method_name, shared_critic_pass=shared)
        torch.manual_seed(3)
        b, out = batch(), {}
        loss, _ = method.generator_loss(triad, b)
        loss.backward()
        out["generator"] = [p.grad.clone() for p in triad.generator_parameters()]
        out["critic_after_generator_turn"] = [p.grad for p in triad.critic_parameters()]
        dm_call = calls[0][0]
        if fresh:  # the reused prediction replaced by a new forward on the same inputs
            b["critic_pass"] = (dm_call[1], triad.fake_score(*dm_call))
        n_before = len(calls)
        loss, logs = method.fake_score_loss(triad, b)
        loss.backward()
        out["critic"] = [p.grad.clone() for p in triad.critic_parameters()]
        out["critic_calls"] = len(calls) - n_before
        out["critic_loss"] = logs["loss_fake"]
        return out

    separate, shared, fresh = run(False), run(True), run(True, fresh=True)
    for a, b in zip(separate["generator"], shared["generator"]):  # the generator's update does not change
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(g is None for g in shared["critic_after_generator_turn"])  # its backward left the critic alone
    assert shared["critic_calls"] == separate["critic_calls"] - 1  # one forward fewer
    assert any(g.abs().sum() > 0 for g in shared["critic"])
    for a, b in zip(fresh["critic"], shared["critic"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fresh["critic_loss"], shared["critic_loss"])


def test_shared_critic_pass_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="fake_first"):
        build_method("dmd", shared_critic_pass=True, fake_first=True)
    with pytest.raises(ValueError, match="gndm"):
        build_method("gndm", shared_critic_pass=True)

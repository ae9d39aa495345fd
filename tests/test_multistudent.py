"""Multi-student distillation: routers, Teacher Score Matching, the multi-student export, and runs end to end."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_distill, tiny_unet
from diffusers import DDPMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from onestep.config import ConfigError, load_config
from onestep.data import RealImages
from onestep.denoiser import Denoiser
from onestep.multistudent import (RoutedDenoiser, Router, RoutingError, affinity_groups, balanced_groups,
                                  build_router, count_parameters, own_real_images, routed_sample, small_backbone,
                                  teacher_score_matching, train_students)
from onestep.pipeline import OneStepPipeline
from onestep.pipeline_multi import MultiStudentPipeline
from onestep.schedule import Schedule
from onestep.streaming import pipeline_source, sample_seed
from onestep.triad import Triad

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)
SMOKE = ["--preset", "smoke", "--cpu_threads", "1"]


def schedule():
    return Schedule.from_scheduler_config(dict(DDPMScheduler().config))


def clusters(n_per: int = 4, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Prompt-like embeddings (N, L, D) from three well-separated directions, and each row's true cluster."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, 6) * 5
    rows = [centres[c] + 0.1 * torch.randn(4, 6, generator=g) for c in range(3) for _ in range(n_per)]
    return torch.stack(rows), [c for c in range(3) for _ in range(n_per)]


# ---- routers -------------------------------------------------------------------------------------------
@given(st.lists(st.integers(0, 30), min_size=1, max_size=12, unique=True), st.integers(1, 12))
@settings(max_examples=40, deadline=None)
def test_every_class_maps_to_exactly_one_student(classes, k):
    if k > len(classes):
        with pytest.raises(RoutingError, match="students"):
            build_router("balanced", k, classes=classes)
        return
    router = build_router("auto", k, classes=classes)
    assert router.kind == "balanced" and router.num_students == k
    assert sorted(c for g in router.groups for c in g) == sorted(classes)  # a partition
    assert max(map(len, router.groups)) - min(map(len, router.groups)) <= 1  # balanced
    route = router.route(torch.tensor(classes))
    for c, s in zip(classes, route.tolist()):
        assert c in router.groups[s]
    with pytest.raises(RoutingError, match="served by no student"):
        router.route(torch.tensor([31]))


@given(st.integers(2, 9), st.integers(1, 4), st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_confusion_groups_are_balanced_and_no_swap_improves_them(n, k, seed):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=g, dtype=torch.float64)
    a = (a + a.T) / 2
    sizes = [len(x) for x in balanced_groups(range(n), k)]
    groups = affinity_groups(a, sizes)
    assert sorted(i for grp in groups for i in grp) == list(range(n)) and [len(x) for x in groups] == sizes

    def within(gs):
        return sum(a[i, j].item() for grp in gs for i in grp for j in grp if i < j)

    best = within(groups)
    for x in range(k):
        for y in range(x + 1, k):
            for i in groups[x]:
                for j in groups[y]:
                    swapped = [list(grp) for grp in groups]
                    swapped[x][swapped[x].index(i)], swapped[y][swapped[y].index(j)] = j, i
                    assert within(swapped) <= best + 1e-9


def test_confusion_groups_put_confused_classes_together():
    a = torch.full((6, 6), 0.01, dtype=torch.float64)
    for i, j in ((0, 4), (1, 3), (2, 5)):  # the pairs the teacher mixes up
        a[i, j] = a[j, i] = 0.2
    assert sorted(affinity_groups(a, [2, 2, 2])) == [[0, 4], [1, 3], [2, 5]]


def test_kmeans_router_finds_the_prompt_clusters_and_routes_new_prompts_to_the_nearest():
    embeds, truth = clusters()
    router = build_router("auto", 3, prompt_embeds=embeds, seed=1)
    assert router.kind == "kmeans" and router.centroids.shape == (3, 6)
    assert sorted(sorted(g) for g in router.groups) == [list(range(i * 4, i * 4 + 4)) for i in range(3)]
    route = router.route(embeds)
    for row, s in enumerate(route.tolist()):
        assert row in router.groups[s]  # training prompts: exactly the student that trained on them
    new, new_truth = clusters(n_per=2, seed=7)
    student_of = {truth[router.groups[s][0]]: s for s in range(3)}
    assert router.route(new).tolist() == [student_of[c] for c in new_truth]
    with pytest.raises(RoutingError, match="fewer than 3 distinct"):
        build_router("kmeans", 3, prompt_embeds=embeds[:1].expand(5, -1, -1))


def test_each_kmeans_student_keeps_the_real_pairs_routed_to_it():
    embeds, _ = clusters()
    router = build_router("kmeans", 3, prompt_embeds=embeds, seed=1)
    captions, _ = clusters(n_per=3, seed=5)  # real images' caption embeddings, other draws of the same clusters
    data = RealImages(torch.arange(len(captions), dtype=torch.float32).view(-1, 1, 1, 1), conds=captions)
    kept = [own_real_images(data, router, k) for k in range(3)]
    assert sorted(int(i) for d in kept for i in d.samples.flatten()) == list(range(len(captions)))  # a partition
    for k, d in enumerate(kept):
        assert len(d) == 3 and torch.equal(d.conds, captions[d.samples.flatten().long()])  # pairs stay pairs
        assert (router.route(d.conds) == k).all()


def test_router_kind_must_fit_the_conditions():
    embeds, _ = clusters()
    with pytest.raises(RoutingError, match="router: 'balanced' does not route prompts"):
        build_router("balanced", 2, prompt_embeds=embeds)
    with pytest.raises(RoutingError, match="router: 'kmeans' does not route class labels"):
        build_router("kmeans", 2, classes=[0, 1, 2])


def test_router_save_load_round_trip(tmp_path):
    embeds, _ = clusters()
    for i, router in enumerate([build_router("balanced", 3, classes=[2, 5, 7, 8, 9]),
                                build_router("kmeans", 3, prompt_embeds=embeds),
                                Router("confusion", [[5, 9], [3, 8]])]):
        router.save(str(tmp_path / str(i)))
        loaded = Router.load(str(tmp_path / str(i)))
        assert loaded.kind == router.kind and loaded.groups == router.groups
        cond = embeds if router.kind == "kmeans" else torch.tensor([c for g in router.groups for c in g])
        assert torch.equal(loaded.route(cond), router.route(cond))
        assert (loaded.centroids is None) == (router.centroids is None)
        if router.centroids is not None:
            assert torch.equal(loaded.centroids, router.centroids)


# ---- the multi-student pipeline ------------------------------------------------------------------------
def tiny_pipes(k: int) -> list[OneStepPipeline]:
    return [OneStepPipeline(unet=tiny_unet(seed=10 + i), scheduler=DDPMScheduler(), timesteps=[300], num_classes=10,
                            null_class=10) for i in range(k)]


def test_mixed_batch_equals_each_sample_through_its_own_student_and_round_trips(tmp_path):
    router = Router("balanced", [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]])
    pipe = MultiStudentPipeline(router, tiny_pipes(3))
    labels = torch.tensor([9, 0, 4, 4, 7, 2, 5, 8])
    z = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mixed = pipe(class_labels=labels, latents=z, output_type="pt").images
    for i, c in enumerate(labels.tolist()):
        own = pipe.pipes[router.route(torch.tensor([c])).item()]
        alone = own(class_labels=[c], latents=z[i:i + 1], output_type="pt").images
        assert torch.allclose(mixed[i:i + 1], alone, atol=1e-5)
    others = [p(class_labels=[labels[0].item()], latents=z[:1], output_type="pt").images for p in pipe.pipes[:2]]
    assert all((o - mixed[:1]).abs().max() > 1e-3 for o in others)  # the students differ: routing matters

    gens = pipe.students()
    with torch.no_grad():  # the trainer's routed sampler: the same images in [-1, 1]
        routed = routed_sample([g.sample for g in gens], router, z, labels)
    assert torch.allclose((routed.clamp(-1, 1) + 1) / 2, mixed, atol=1e-5)

    pipe.save_pretrained(str(tmp_path / "p"))
    loaded = MultiStudentPipeline.from_pretrained(str(tmp_path / "p"))
    assert loaded.num_students == 3 and loaded.router.groups == router.groups
    assert torch.allclose(loaded(class_labels=labels, latents=z, output_type="pt").images, mixed, atol=1e-6)
    pil = loaded(class_labels=[3, 7], generator=torch.Generator().manual_seed(1)).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    with pytest.raises(ValueError, match="class_labels"):
        loaded(prompt="a cat")

    # the evaluation's pipeline source (eval/benchmark.py --pipeline) samples the saved folder through the router
    src = pipeline_source(str(tmp_path / "p"), num_samples=20, seed=5)
    idx = torch.arange(20)
    zs = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(sample_seed(5, i))) for i in range(20)])
    ys = src.labels(idx)
    with torch.no_grad():
        assert torch.equal(src(idx), routed_sample([g.sample for g in gens], router, zs, ys))
    assert sorted(set(router.route(ys).tolist())) == [0, 1, 2]  # every student drew some of them


@torch.no_grad()
def test_generator_lists_follow_each_image_and_without_one_few_step_noise_comes_from_its_latents():
    pipes = [OneStepPipeline(unet=tiny_unet(seed=20 + i), scheduler=DDPMScheduler(), timesteps=[999, 500],
                             num_classes=10, null_class=10) for i in range(2)]
    router = Router("balanced", [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    pipe = MultiStudentPipeline(router, pipes)
    labels = torch.tensor([7, 1, 8])
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(3)]

    mixed = pipe(class_labels=labels, latents=z, generator=gens(), output_type="pt").images
    for i, c in enumerate(labels.tolist()):  # image i re-noises from generator i, whichever student makes it
        own = pipes[router.route(torch.tensor([c])).item()]
        alone = own(class_labels=[c], latents=z[i:i + 1], generator=[gens()[i]], output_type="pt").images
        assert torch.allclose(mixed[i:i + 1], alone, atol=1e-5)
    plain = pipe(class_labels=labels, latents=z, output_type="pt").images  # no generator: each image's own noise
    assert torch.equal(plain, pipe(class_labels=labels, latents=z, output_type="pt").images)
    expected = pipes[0].student().sample(z[1:2], labels[1:2])  # what evaluation measures (label 1: student 0)
    assert torch.allclose(plain[1:2], (expected.clamp(-1, 1) + 1) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        pipe(class_labels=labels, latents=z, generator=gens()[:2])
    with pytest.raises(ValueError, match="one per image"):
        pipes[0](class_labels=[1, 2], generator=gens())


def test_model_cards_give_a_few_step_students_steps():
    from onestep.pipeline import model_card

    metrics = {"method": "dmd", "steps": 4, "teacher_path": "t", "num_classes": 10, "feature_extractor": "digits",
               "num_samples": 8, "teacher": {"fid": 0.2, "nfe": 100}, "student": {"fid": 0.5, "nfe": 2}}
    card = model_card(metrics, "runs/x", False)
    assert "# 2-step student" in card and "| student | 2 | 0.5 |" in card
    assert "# One-step student" in model_card({**metrics, "student": {"fid": 0.5, "nfe": 1}}, "runs/x", False)


def test_routed_students_are_one_generator_with_one_shared_fake_score():
    """--shared_fake_score's triad: K students behind the router as one generator, each sample through its own
    student (also with per-sample times), gradients only into the students that served the batch (zero for the
    others), one fake score
    that starts as the teacher, which never changes."""
    teacher = Denoiser(tiny_unet(), schedule(), null_cond=torch.tensor(10))
    before = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    router = Router("balanced", [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    triad = Triad.from_teacher(teacher, router=router, generator_timesteps=[999])
    gen = triad.raw("generator")
    students = gen.denoiser.students
    assert isinstance(gen.denoiser, RoutedDenoiser) and len(students) == 2
    with torch.no_grad():  # the students differ, so that routing shows
        for p in students[1].backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fake = triad.raw("fake_score")
    assert fake.backbone is not teacher.backbone and all(
        torch.equal(v, before[k]) for k, v in fake.backbone.state_dict().items())
    labels = torch.tensor([7, 0, 4, 9, 5, 2])
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 500, 250, 999, 100, 700])
    for tt in (999, t):
        out = gen.denoiser(z, tt, labels)
        for i, c in enumerate(labels.tolist()):
            own = students[router.route(torch.tensor([c])).item()]
            alone = own(z[i:i + 1], tt if isinstance(tt, int) else tt[i:i + 1], labels[i:i + 1])
            assert torch.allclose(out[i:i + 1], alone, rtol=1e-4, atol=1e-4)
            other = students[1 - router.route(torch.tensor([c])).item()](z[i:i + 1], 999, labels[i:i + 1])
            assert (other - out[i:i + 1]).abs().max() > 1e-2 * out[i:i + 1].abs().max()
    gen(z[labels < 5], 999, labels[labels < 5]).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in students[0].parameters() if p.ndim > 1)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in students[1].parameters())  # zero, for DDP
    assert all(p.grad is None for p in teacher.parameters()) and triad.generator_parameters()
    assert len(triad.generator_parameters()) == 2 * len([p for p in teacher.backbone.parameters()])
    assert all(torch.equal(v, before[k]) for k, v in teacher.backbone.state_dict().items())


# ---- smaller students ----------------------------------------------------------------------------------
def test_small_backbone_is_the_teachers_architecture_with_fewer_channels():
    teacher = tiny_unet()
    small = small_backbone(teacher, [4, 8])
    assert list(small.config.block_out_channels) == [4, 8] and count_parameters(small) < count_parameters(teacher) / 2
    assert small.config.down_block_types == teacher.config.down_block_types
    assert torch.equal(small_backbone(teacher, [4, 8]).conv_in.weight, small.conv_in.weight)  # seeded
    with pytest.raises(RoutingError, match="student_channels: .* multiples of the teacher's norm_num_groups"):
        small_backbone(teacher, [6, 8])
    with pytest.raises(RoutingError, match="has 3 levels"):
        small_backbone(teacher, [4, 8, 8])

    triad = Triad.from_teacher(Denoiser(teacher, schedule(), null_cond=10), student_backbone=small)
    for role in ("generator", "fake_score"):
        backbone = triad.raw(role).denoiser.backbone if role == "generator" else triad.raw(role).backbone
        assert list(backbone.config.block_out_channels) == [4, 8] and backbone is not small
    assert list(triad.teacher.backbone.config.block_out_channels) == [8, 16]

    # --student_fake_score teacher: a small generator, a trainable float32 copy of the teacher as its fake score
    triad = Triad.from_teacher(Denoiser(teacher, schedule(), null_cond=10), student_backbone=small,
                               fake_from_teacher=True)
    fake = triad.raw("fake_score").backbone
    assert list(triad.raw("generator").denoiser.backbone.config.block_out_channels) == [4, 8]
    assert fake is not teacher and list(fake.config.block_out_channels) == [8, 16]
    assert all(torch.equal(a, b) for a, b in zip(fake.state_dict().values(), teacher.state_dict().values()))
    assert {p.requires_grad for p in fake.parameters()} == {True} and {p.requires_grad for p in teacher.parameters()} == {False}


def test_teacher_score_matching_moves_the_small_denoiser_toward_the_teacher():
    sched = schedule()
    teacher = Denoiser(tiny_unet(), sched, null_cond=10)
    student = Denoiser(small_backbone(teacher.backbone, [4, 8]), sched, null_cond=10)
    g = torch.Generator().manual_seed(5)
    x_t, t, c = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 1000, (64,), generator=g), torch.arange(64) % 3

    def gap() -> float:
        with torch.no_grad():
            w = sched.loss_weight(t, "epsilon")
            return (w * (student(x_t, t, c) - teacher(x_t, t, c)).square().mean((1, 2, 3))).mean().item()

    before, teacher_state = gap(), {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    r = teacher_score_matching(student, teacher, torch.arange(3), (1, 8, 8), steps=60, lr=3e-3, batch_size=16, pool=32,
                               sampler_steps=2)
    assert gap() < 0.5 * before and r["loss_last"] < r["loss_first"]
    assert all(torch.equal(v, teacher.backbone.state_dict()[k]) for k, v in teacher_state.items())


# ---- configuration and bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [(["--students", "0"], "students: must be > 0"),
                                          (["--router", "random"], "router: 'random' is not one of"),
                                          (["--student_channels", "16,0,32"], "student_channels: channel counts"),
                                          (["--tsm_steps", "-1"], "tsm_steps: must be >= 0")])
def test_bad_multi_student_options_name_key_and_value(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_conditions_the_router_cannot_split_stop_before_training(cond_teacher, uncond_teacher, tmp_path):
    def refused(args, message):
        overwrite = [] if "--resume" in args else ["--overwrite"]  # (the two together are refused)
        cfg = load_config(["--teacher", cond_teacher, "--output_dir", str(tmp_path), *overwrite, *SMOKE, *args])
        with pytest.raises(ConfigError if message.startswith(("students: an", "resume")) else RoutingError, match=message):
            train_students(cfg, train=None)

    refused(["--teacher", uncond_teacher, "--students", "2"], "students: an unconditional teacher")
    refused(["--students", "2", "--router", "kmeans"], "router: 'kmeans' does not route class labels")
    refused(["--students", "4", "--classes", "1,2,3"], "students: 4 students need at least 4 classes")
    refused(["--students", "2", "--student_channels", "5,8"], "norm_num_groups")
    refused(["--students", "2", "--resume", "/some/checkpoint"], "resume: a multi-student run resumes with 'latest'")


def test_bad_input_is_one_line_from_the_command(cond_teacher, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), *SMOKE, "--teacher", cond_teacher,
           "--output_dir", str(tmp_path), "--students", "3", "--router", "kmeans"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: router: 'kmeans'"), r.stderr[-2000:]


# ---- end to end ----------------------------------------------------------------------------------------
def checkpoint(run, step=4):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


@pytest.mark.slow
def test_two_students_end_to_end_and_one_student_is_the_plain_run(cond_teacher, tmp_path):
    r = run_distill([*SMOKE, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "k2", "--students", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "k2"
    m = json.loads((run / "metrics.json").read_text())
    assert m["students"] == 2 and m["router"] == {"kind": "balanced", "groups": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
    assert m["student"]["nfe"] == 1 and m["student"]["fid"] > 0 and m["teacher"]["fid"] > 0
    assert (run / "samples" / "students.png").exists() and "MultiStudentPipeline" in (run / "pipeline" / "README.md").read_text()
    for k in range(2):
        sub = json.loads((run / f"student_{k}" / "metrics.json").read_text())
        assert sub["steps"] == 4 and f"classes:\n- {5 * k}" in (run / f"student_{k}" / "config.yaml").read_text()

    # K = 1 with the same classes and seed is the plain single-student path: it reproduces student 0 exactly
    r1 = run_distill([*SMOKE, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "k1", "--students", "1",
                      "--classes", "0,1,2,3,4"])
    assert r1.returncode == 0, r1.stderr[-3000:]
    plain, student0 = checkpoint(tmp_path / "k1"), checkpoint(run / "student_0")
    assert plain.keys() == student0.keys() and all(torch.equal(plain[k], student0[k]) for k in plain)
    assert (tmp_path / "k1" / "pipeline" / "model_index.json").exists()  # the plain export, no router

    multi = MultiStudentPipeline.from_pretrained(str(run / "pipeline"))
    single = OneStepPipeline.from_pretrained(str(tmp_path / "k1" / "pipeline"))
    labels = torch.tensor([3, 7, 0, 9, 4])
    z = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    mixed = multi(class_labels=labels, latents=z, output_type="pt").images
    first = labels < 5  # student 0's classes: the same images as the plain run
    alone = single(class_labels=labels[first], latents=z[first], output_type="pt").images
    assert torch.allclose(mixed[first], alone, atol=1e-6)


@pytest.mark.slow
def test_smaller_students_with_tsm_and_the_confusion_router_under_two_process_ddp(cond_teacher, tmp_path):
    r = run_distill([*SMOKE, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "small", "--students",
                     "3", "--router", "confusion", "--student_channels", "4,8", "--tsm_steps", "8", "--tsm_pool", "32"],
                    env_extra={"ACCELERATE_USE_CPU": "1"}, launcher=["--multi_gpu", "--num_processes", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "small"
    m = json.loads((run / "metrics.json").read_text())
    assert m["processes"] == 2 and r.stdout.count("done: 3 students") == 1
    for k in range(3):  # each student's replicas end with the same weights; its seconds are its sub-run's (all calls)
        sub = json.loads((run / f"student_{k}" / "metrics.json").read_text())
        assert sub["replica_weight_spread"] == 0.0 and m["per_student"][k]["train_seconds"] == sub["train_seconds"]
    groups = m["router"]["groups"]
    assert m["router"]["kind"] == "confusion" and sorted(c for g in groups for c in g) == list(range(10))
    assert m["parameters"]["student"] < m["parameters"]["teacher"] / 2
    assert all(s["tsm"]["steps"] == 8 and s["tsm"]["loss_last"] > 0 for s in m["per_student"])
    multi = MultiStudentPipeline.from_pretrained(str(run / "pipeline"))
    assert all(list(p.unet.config.block_out_channels) == [4, 8] for p in multi.pipes)
    assert Router.load(str(run)).groups == groups == multi.router.groups


@pytest.mark.slow
def test_students_with_one_shared_fake_score_train_jointly_under_two_process_ddp(cond_teacher, tmp_path):
    """--shared_fake_score: smaller students (TSM each, and one more for the fake score) trained in one run behind
    the router, batch 2 per process so that a student often serves no sample on a process (DDP's unused
    parameters); every student moves, the replicas agree, and the export holds each student's weights."""
    r = run_distill([*SMOKE, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "shared", "--students",
                     "3", "--shared_fake_score", "--student_channels", "4,8", "--tsm_steps", "4", "--tsm_pool", "16",
                     "--batch_size", "2", "--steps", "6", "--update_ratio", "1", "--ema_decay", "0",
                     "--checkpoints_total_limit", "3"],
                    env_extra={"ACCELERATE_USE_CPU": "1"}, launcher=["--multi_gpu", "--num_processes", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "shared"
    m = json.loads((run / "metrics.json").read_text())
    assert m["shared_fake_score"]["tsm"]["steps"] == 4 and all(s["tsm"]["steps"] == 4 for s in m["per_student"])
    assert not any((run / f"student_{k}").exists() for k in range(3))
    assert "6 training iterations of the students together" in (run / "pipeline" / "README.md").read_text()
    joint = json.loads((run / "students" / "metrics.json").read_text())
    assert joint["processes"] == 2 and joint["replica_weight_spread"] == 0.0 and joint["steps"] == 6
    assert m["shared_fake_score"]["train_seconds"] == joint["train_seconds"]
    state = checkpoint(run / "students", 6)
    fake = {k for k in state if k.startswith("fake_score.") or not k.startswith("denoiser.")}
    assert {k.split(".")[2] for k in state if k.startswith("denoiser.students.")} == {"0", "1", "2"}
    assert not any(".students." in k for k in fake)  # one fake score, not one per student
    first = checkpoint(run / "students", 2)
    multi = MultiStudentPipeline.from_pretrained(str(run / "pipeline"))
    for k, pipe in enumerate(multi.pipes):
        mine = {n.removeprefix(f"denoiser.students.{k}.backbone."): v for n, v in state.items()
                if n.startswith(f"denoiser.students.{k}.backbone.")}
        exported = pipe.unet.state_dict()
        assert mine.keys() == exported.keys() and all(torch.equal(mine[n], exported[n]) for n in mine)
        assert any(not torch.equal(first[f"denoiser.students.{k}.backbone.{n}"], mine[n]) for n in mine)


def test_shared_fake_score_needs_several_students():  # and FSDP refuses it: tests/test_fsdp.py
    with pytest.raises(ConfigError, match="shared_fake_score: shares one fake score among --students K > 1"):
        load_config(["--shared_fake_score"])


@pytest.mark.slow
def test_text_students_route_prompts_by_kmeans_end_to_end(tmp_path):
    from test_sd import save_tiny_sd

    sd = save_tiny_sd(str(tmp_path / "sd"))
    prompts = ["a photo of a cat", "a photo of a cat, close up", "a red car on a road", "a red car, side view"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    r = run_distill(["--preset", "sd15-dmd2", "--teacher", sd, "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
                     "--batch_size", "2", "--update_ratio", "2", "--output_dir", str(tmp_path), "--name", "text",
                     "--students", "2", "--sample_every", "0", "--checkpoint_every", "0", "--cpu_threads", "1"],
                    env_extra={"ONESTEP_PROMPT_CACHE_MB": "0"})  # prompts encoded as routed and drawn, not cached
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "text"
    m = json.loads((run / "metrics.json").read_text())
    own = [(run / f"student_{k}" / "prompts.txt").read_text().splitlines() for k in range(2)]
    assert m["router"]["kind"] == "kmeans" and m["router"]["groups"] == own and sorted(sum(own, [])) == sorted(prompts)
    assert json.loads((run / "pipeline" / "student_0" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionPipeline" and (run / "pipeline" / "student_1" / "unet" / "config.json").exists()

    pipe = MultiStudentPipeline.from_pretrained(str(run / "pipeline"))
    route = pipe.router.route(pipe._encode(prompts)).tolist()
    assert [p in own[k] for p, k in zip(prompts, route)] == [True] * 4  # each prompt to the student trained on it
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mixed = pipe(prompt=prompts, latents=z, output_type="pt").images
    assert mixed.shape == (4, 3, 16, 16)
    for i, p in enumerate(prompts):
        alone = pipe(prompt=p, latents=z[i:i + 1], output_type="pt").images
        assert torch.allclose(mixed[i:i + 1], alone, atol=1e-5)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]  # one per image, each to the student it routes to
    assert pipe(prompt=prompts, latents=z, generator=gens, output_type="pt").images.shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="call without num_inference_steps"):
        pipe(prompt=prompts, num_inference_steps=2)
    from onestep.prompt_sources import renoise_generators
    from onestep.streaming import pipeline_source, sample_seed

    src = pipeline_source(str(run / "pipeline"), 4, prompts=prompts)  # the benchmark's source: sample i, prompt i % 4
    z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(sample_seed(0, i))) for i in range(4)])
    want = pipe(prompt=prompts, latents=z, generator=renoise_generators(0, torch.arange(4)), output_type="pt").images
    assert src.image_shape == (3, 16, 16) and torch.allclose(src(torch.arange(4)), want * 2 - 1, atol=1e-5)


@pytest.mark.slow
def test_text_students_gan_sees_the_real_images_of_its_own_prompts(tmp_path):
    """DMD2's GAN on k-means students: each student's critic gets the captioned real images routed to it (captions
    equal to the prompts: two of the four each), so a batch of 3 is more than any student has."""
    from PIL import Image
    from test_sd import save_tiny_sd

    sd = save_tiny_sd(str(tmp_path / "sd"))
    prompts = ["a photo of a cat", "a photo of a cat, close up", "a red car on a road", "a red car, side view"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    for i, p in enumerate(prompts):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(p + "\n")
    r = run_distill(["--preset", "sd15-dmd2", "--teacher", sd, "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
                     "--dataset", str(data), "--gan_generator_weight", "5e-3", "--gan_critic_weight", "1e-2",
                     "--batch_size", "3", "--output_dir", str(tmp_path), "--name", "text", "--students", "2",
                     "--sample_every", "0", "--checkpoint_every", "0", "--cpu_threads", "1"])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]  # (accelerate launch exits 1 on the 2)
    assert "2 real images of student_0 (its conditions), fewer than one batch (3 per process" in lines[0], lines


@pytest.mark.slow
def test_text_students_share_one_lora_fake_score(tmp_path):
    """--shared_fake_score on a text teacher with VSD's LoRA fake score: one run routes each prompt's samples to its
    student by the k-means router, the students train, and the export routes as the training did."""
    from test_sd import save_tiny_sd

    sd = save_tiny_sd(str(tmp_path / "sd"))
    prompts = ["a photo of a cat", "a photo of a cat, close up", "a red car on a road", "a red car, side view"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    r = run_distill(["--preset", "sd15-vsd", "--teacher", sd, "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
                     "--batch_size", "4", "--output_dir", str(tmp_path), "--name", "text", "--students", "2",
                     "--shared_fake_score", "--sample_every", "0", "--checkpoint_every", "0", "--cpu_threads", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "text"
    assert not (run / "student_0").exists() and (run / "students" / "metrics.json").exists()
    state = checkpoint(run / "students", 2)
    fake = load_file(str(run / "students" / "checkpoints" / "step_0000002" / "model_1.safetensors"))
    assert any(".students.1." in k for k in state) and fake and all("lora_" in k for k in fake)  # one LoRA critic
    teacher_unet = load_file(glob.glob(str(tmp_path / "sd" / "unet" / "*.safetensors"))[0])
    pipe = MultiStudentPipeline.from_pretrained(str(run / "pipeline"))
    m = json.loads((run / "metrics.json").read_text())
    route = pipe.router.route(pipe._encode(prompts)).tolist()
    assert [p in m["router"]["groups"][k] for p, k in zip(prompts, route)] == [True] * 4
    exported = load_file(glob.glob(str(run / "pipeline" / "student_0" / "unet" / "*.safetensors"))[0])
    assert exported.keys() == teacher_unet.keys() and any(not torch.equal(exported[k], teacher_unet[k]) for k in exported)


def test_model_card_without_a_teacher_fid_lists_the_students_row_only():
    from onestep.pipeline_multi import model_card_multi

    metrics = {"students": 2, "method": "dmd2", "teacher_path": "t", "steps": 4, "router": {"kind": "balanced"},
               "per_student": [{"student": 0, "conditions": [0], "parameters": 10},
                               {"student": 1, "conditions": [1], "parameters": 10}],
               "parameters": {"teacher": 20}, "feature_extractor": "digits", "num_samples": 8,
               "teacher": {"fid": None, "nfe": None}, "student": {"fid": 0.5, "class_accuracy": 0.9, "nfe": 1}}
    card = model_card_multi(metrics, "runs/x")  # --teacher_eval_steps []: no teacher FID
    assert "| 2 students | 1 | 0.5 | 0.9 |" in card and "| teacher |" not in card
    metrics["teacher"] = {"fid": 0.25, "nfe": 100, "class_accuracy": 1.0}
    assert "| teacher | 100 | 0.25 | 1 |" in model_card_multi(metrics, "runs/x")

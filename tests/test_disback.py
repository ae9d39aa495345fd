"""DisBack: the degradation recording (nodes, resume, identity) and the backtracking target schedule around methods."""
import json
import os

import pytest
import torch
from conftest import run_distill, tiny_unet
from diffusers import DDPMScheduler

from onestep.denoiser import Denoiser
from onestep.disback import DisBack, RecordingError, RecordingSettings, load_node, record_degradation
from onestep.methods import build_method
from onestep.regression import regression_distance
from onestep.sampling import sample_teacher
from onestep.schedule import Schedule
from onestep.triad import Triad

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 8, 8)
FAST = RecordingSettings(interval=4, lr=2e-3, batch_size=8)


def make_triad(fake_score="copy", gan=False, teacher_seed=0):
    sched = Schedule.from_scheduler_config(dict(DDPMScheduler().config))
    teacher = Denoiser(tiny_unet(seed=teacher_seed), sched, null_cond=10)
    return Triad.from_teacher(teacher, fake_score=fake_score, lora_rank=4, gan_head=gan, sample_shape=SHAPE,
                              example_cond=torch.tensor([0]), generator_timesteps=[300])


def draw_cond(n, generator=None):
    return torch.randint(0, 10, (n,), generator=generator)


def params(backbone, names):
    named = dict(backbone.named_parameters())
    return {n: named[n].detach().clone() for n in names}


def equal(a, b):
    return all(torch.equal(a[k].float(), b[k].float()) for k in a)


def record(triad, folder, nodes, settings=FAST):
    return record_degradation(triad, draw_cond, SHAPE, "cpu", str(folder), nodes, settings)


@pytest.mark.parametrize("fake_score", ["copy", "lora"])
def test_recording_nodes_are_distinct_and_move_away_from_the_teacher(tmp_path, fake_score):
    triad = make_triad(fake_score)
    teacher_before = {k: v.clone() for k, v in triad.teacher.backbone.state_dict().items() if "lora_" not in k}
    rec = record(triad, tmp_path, 3)
    assert sorted(os.listdir(tmp_path)) == ["index.json", "node_001.safetensors", "node_002.safetensors",
                                            "node_003.safetensors", "optimizer.safetensors"]
    nodes = [rec.node(k) for k in (1, 2, 3)]
    start = params(make_triad(fake_score).raw("fake_score").backbone, rec.names)  # node 0
    for a, b in zip([start] + nodes, nodes):
        assert not equal(a, b), "two consecutive nodes hold the same weights"
    d = rec.distances
    assert 0 < d[0] < d[1] < d[2], d  # monotonically away from the teacher
    recomputed = torch.sqrt(sum((nodes[2][n] - start[n]).square().sum() for n in rec.names)).item()
    assert recomputed == pytest.approx(d[2], rel=1e-5)
    assert equal(params(triad.raw("fake_score").backbone, rec.names), nodes[2])  # the fake score ends on S'_N
    after = triad.teacher.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in teacher_before.items())  # the teacher never moves
    if fake_score == "lora":
        assert rec.names and all("lora_" in n for n in rec.names)  # a LoRA node holds the adapter only


def test_recording_resumes_extends_and_is_reused(tmp_path):
    straight = record(make_triad(), tmp_path / "a", 3)
    record(make_triad(), tmp_path / "b", 2)  # an interrupted recording ...
    resumed = record(make_triad(), tmp_path / "b", 3)  # ... continued by a new run: the same node 3, bit for bit
    assert equal(straight.node(3), resumed.node(3))
    mtime = os.path.getmtime(tmp_path / "b" / "node_003.safetensors")
    triad = make_triad()
    reused = record(triad, tmp_path / "b", 2)  # fewer nodes: nothing trained, the fake score loads S'_2
    assert os.path.getmtime(tmp_path / "b" / "node_003.safetensors") == mtime
    assert equal(params(triad.raw("fake_score").backbone, reused.names), straight.node(2))


def test_recording_for_another_teacher_or_settings_is_refused(tmp_path):
    record(make_triad(), tmp_path, 1)
    with pytest.raises(RecordingError, match="another teacher"):
        record(make_triad(teacher_seed=1), tmp_path, 1)
    with pytest.raises(RecordingError, match="lr="):
        record(make_triad(), tmp_path, 1, RecordingSettings(interval=4, lr=1e-3, batch_size=8))
    with pytest.raises(RecordingError, match="network="):
        record(make_triad("lora"), tmp_path, 1)


def test_a_node_must_match_the_network_key_for_key():
    """The released code loaded whole-model state dicts with strict=False and matched no key; here that is an error."""
    backbone = make_triad().raw("fake_score").backbone
    names = [n for n, _ in backbone.named_parameters()]
    state = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    with pytest.raises(RecordingError, match="does not fit"):
        load_node(backbone, {f"module.{k}": v for k, v in state.items()}, names)
    with pytest.raises(RecordingError, match="does not fit"):
        load_node(backbone, dict(list(state.items())[:-1]), names)


def wrapper(base="dmd2", nodes=3, interval=2, folder="", **kw):
    return DisBack(build_method(base), nodes=nodes, interval=interval, recording=FAST, record_dir=str(folder), **kw)


def test_each_switch_loads_the_next_node_and_the_last_target_is_the_teacher(tmp_path):
    triad = make_triad()
    teacher = triad.teacher
    fresh = tiny_unet(seed=0).state_dict()  # the teacher's weights as saved
    x, t, c = torch.randn(2, *SHAPE), torch.tensor([100, 700]), torch.tensor([1, 2])
    out_teacher = teacher(x, t, c)
    m = wrapper(folder=tmp_path)
    m.prepare(triad, draw_cond, SHAPE, "cpu")
    rec = m._rec
    assert equal(params(triad.raw("fake_score").backbone, rec.names), rec.node(3))  # the fake score starts at S'_N
    assert m.node == 2 and triad.teacher is not teacher
    assert equal(params(triad.teacher.backbone, rec.names), rec.node(2))  # the target starts at S'_{N-1}
    seen = [2]
    for step in range(6):
        before = params(triad.teacher.backbone, rec.names)
        m.on_step(triad, step, logs := {})
        assert logs["backtrack_node"] == m.node
        if m.node != seen[-1]:
            seen.append(m.node)
            after = params(triad.teacher.backbone, rec.names)
            assert not equal(before, after), "the switch left the target's weights as they were"
            assert equal(after, rec.node(m.node) if m.node else {k: fresh[k] for k in rec.names})
    assert seen == [2, 1, 0] and m.history == [[2, 1], [4, 0]]
    assert triad.teacher is teacher and m._target is None  # the teacher module itself; the node copy is freed
    assert all(torch.equal(v, fresh[k]) for k, v in triad.teacher.backbone.state_dict().items())
    assert torch.equal(triad.teacher(x, t, c), out_teacher)


def test_plateau_switches_early_and_interval_bounds_the_stay(tmp_path):
    m = wrapper(nodes=3, interval=50, folder=tmp_path, switch="plateau", patience=5)
    triad = make_triad()
    m.prepare(triad, draw_cond, SHAPE, "cpu")
    for step in range(8):  # a flat DM-gradient norm: a plateau after `patience` iterations
        m.on_step(triad, step, {"dm_grad_norm": 1.0})
    assert m.history == [[6, 1]]
    for step in range(8, 80):  # a falling norm: no plateau, the stay ends after `interval` iterations
        m.on_step(triad, step, {"dm_grad_norm": 0.9 ** step})
    assert m.history == [[6, 1], [56, 0]]


def test_state_dict_resumes_the_schedule(tmp_path):
    a = wrapper(folder=tmp_path)
    a.prepare(make_triad(), draw_cond, SHAPE, "cpu")
    for step in range(3):
        a.on_step(a._triad, step, {})
    state = json.loads(json.dumps(a.state_dict()))  # plain values: it travels in a checkpoint
    b, triad = wrapper(folder=tmp_path), make_triad()
    b.prepare(triad, draw_cond, SHAPE, "cpu")  # the recording is reused
    assert b.node == 2
    b.load_state_dict(state)
    assert b.node == a.node == 1 and b.history == a.history
    assert equal(params(triad.teacher.backbone, b._rec.names), b._rec.node(1))
    b.on_step(triad, 3, {})
    assert b.node == 0 and b.history == [[2, 1], [4, 0]]


@pytest.mark.parametrize("base,fake_score", [("dmd2", "copy"), ("sid", "copy"), ("vsd", "lora"), ("dmd", "copy")])
def test_backtracking_trains_with_each_method(tmp_path, base, fake_score):
    triad = make_triad(fake_score, gan=base == "dmd2")
    teacher, teacher_before = triad.teacher, {k: v.clone() for k, v in triad.teacher.backbone.state_dict().items()
                                              if "lora_" not in k}
    m = DisBack(build_method(base, **({"real_guidance_scale": 2.0} if base == "vsd" else {})), nodes=2, interval=3,
                recording=FAST, record_dir=str(tmp_path))
    m.prepare(triad, draw_cond, SHAPE, "cpu")
    plain = build_method(base)  # everything else is the base method's
    assert m.fake_first == plain.fake_first and getattr(m, "uses_gan", False) == (base == "dmd2")
    assert hasattr(m, "setup") == hasattr(plain, "setup") and m.needs_real_images == plain.needs_real_images
    target = triad.teacher
    opt_g = torch.optim.AdamW(triad.generator_parameters(), lr=1e-3)
    opt_f = torch.optim.AdamW(triad.critic_parameters(), lr=1e-3)
    x, t, c = torch.randn(2, *SHAPE), torch.tensor([100, 700]), torch.tensor([1, 2])
    assert not torch.allclose(target(x, t, c), teacher(x, t, c))  # during backtracking the target is not the teacher
    for step in range(6):
        batch = {"z": torch.randn(4, *SHAPE), "cond": torch.randint(0, 10, (4,)), "step": step,
                 "real": torch.rand(4, *SHAPE) * 2 - 1, "real_cond": torch.randint(0, 10, (4,))}
        logs = {}
        for turn, fn, opt in (("generator", m.generator_loss, opt_g), ("fake", m.fake_score_loss, opt_f)):
            if turn == "generator" and not m.is_generator_step(step):
                continue
            loss, turn_logs = fn(triad, batch)
            opt.zero_grad()
            loss.backward()
            assert torch.isfinite(loss)
            assert all(p.grad is None for p in target.backbone.parameters())  # the node copy stays frozen
            opt.step()
            logs.update(turn_logs)
        m.on_step(triad, step, logs)
    assert m.history == [[3, 0]] and triad.teacher is teacher
    after = teacher.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in teacher_before.items())
    assert m.extra_metrics()["disback"]["switches"] == [[3, 0]]


def test_dmd_regression_pairs_and_feature_distance_stay_the_teachers_while_backtracking(tmp_path):
    triad = make_triad()
    teacher = triad.teacher
    m = DisBack(build_method("dmd", regression_weight=0.25, regression_distance="teacher", regression_pairs=4,
                             regression_steps=2), nodes=2, interval=3, recording=FAST, record_dir=str(tmp_path))
    m.prepare(triad, draw_cond, SHAPE, "cpu")
    assert triad.teacher is not teacher  # the DM target is a node
    z, c, y = m._pairs
    assert torch.equal(y, sample_teacher(teacher, z, c, 2, 1.0))  # pairs of the teacher's ODE, not of the node
    x = torch.randn(4, *SHAPE)
    torch.manual_seed(0)
    during = regression_distance("teacher", triad, x, y, c, 0.1)
    node, triad.teacher = triad.teacher, teacher
    torch.manual_seed(0)
    assert torch.equal(during, regression_distance("teacher", triad, x, y, c, 0.1))  # the teacher's features
    triad.teacher = node
    torch.manual_seed(0)
    assert not torch.equal(during, regression_distance("teacher", make_triad(teacher_seed=1), x, y, c, 0.1))


@pytest.mark.slow
def test_backtrack_command_records_once_and_reuses_for_another_method(cond_teacher, tmp_path):
    common = ["--preset", "smoke", "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--backtrack",
              "--backtrack_nodes", "2", "--backtrack_interval", "2", "--record_interval", "3", "--export", "false",
              "--classifier", ""]
    r = run_distill([*common, "--name", "dmd2", "--method", "dmd2"])
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((tmp_path / "dmd2" / "metrics.json").read_text())["disback"]
    assert d["switches"] == [[2, 0]] and d["final_node"] == 0 and d["recording_updates"] == 6
    index = os.path.join(d["folder"], "index.json")
    assert os.path.dirname(d["folder"]) == str(tmp_path / "disback") and len(json.load(open(index))["nodes"]) == 2
    mtime = os.path.getmtime(index)
    ckpt = tmp_path / "dmd2" / "checkpoints" / "step_0000002"  # saved after the switch at iteration 2
    r = run_distill([*common, "--name", "dmd2", "--method", "dmd2", "--resume", str(ckpt)])
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((tmp_path / "dmd2" / "metrics.json").read_text())["disback"]
    assert d["switches"] == [[2, 0]] and d["final_node"] == 0  # the schedule continued, not restarted at S'_1
    r = run_distill([*common, "--name", "sid", "--method", "sid", "--adam_beta1", "0.9"])  # the same recording serves
    assert r.returncode == 0, r.stderr[-3000:]                                             # SiD at DMD2's betas
    assert os.path.getmtime(index) == mtime
    assert json.loads((tmp_path / "sid" / "metrics.json").read_text())["disback"]["folder"] == d["folder"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "sid" / "logs" / "onestep")).Reload()
    node = [e.value for e in events.Scalars("backtrack_node")]  # the node in use: S'_1, then the teacher (0)
    assert node[0] == 1 and node[-1] == 0


@pytest.mark.parametrize("args,key", [(["--backtrack_interval", "4"], "backtrack_interval"),  # 1 node x 4 >= 4 steps
                                      (["--backtrack_switch", "often"], "backtrack_switch"),
                                      (["--record_cond_dropout", "2"], "record_cond_dropout"),
                                      (["--gan_feature_source", "teacher"], "gan_feature_source")])
def test_bad_backtrack_options_are_one_line_errors(args, key):
    from onestep.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"^{key}: ") as e:
        load_config(["--preset", "smoke", "--backtrack", "--backtrack_nodes", "2", "--backtrack_interval", "2", *args])
    assert "\n" not in str(e.value)


def test_schedule_state_travels_in_an_accelerate_checkpoint(tmp_path):
    from accelerate import Accelerator

    a = wrapper(folder=tmp_path / "rec")
    a.prepare(make_triad(), draw_cond, SHAPE, "cpu")
    for step in range(3):
        a.on_step(a._triad, step, {})
    acc = Accelerator(cpu=True)
    acc.register_for_checkpointing(a)
    acc.save_state(str(tmp_path / "ckpt"))
    b, triad = wrapper(folder=tmp_path / "rec"), make_triad()
    b.prepare(triad, draw_cond, SHAPE, "cpu")
    acc = Accelerator(cpu=True)
    acc.register_for_checkpointing(b)
    acc.load_state(str(tmp_path / "ckpt"))
    assert (b.node, b.history, b.state_dict()) == (a.node, a.history, a.state_dict())
    assert equal(params(triad.teacher.backbone, b._rec.names), b._rec.node(1))


def test_state_dict_carries_the_base_methods_own_state(tmp_path):
    """Around a method with its own state (GNDM: running reward scales, the rollout in reuse) the wrapper's
    checkpoint state holds the base's too, and loading it restores both."""
    def gndm():
        base = build_method("gndm", group_size=2)
        return DisBack(base, nodes=2, interval=2, record_dir=str(tmp_path))

    a = gndm()
    a.base._reward_set.var = {"r": 0.25}
    a.base._roll = {"xs": torch.randn(2, 4, 1, 8, 8), "adv": torch.randn(4), "cond": None, "uses": 1, "logs": {"x": 1.0}}
    a.node, a.history = 0, [[2, 0]]
    state = a.state_dict()
    assert {"node", "base/reward_var/r", "base/rollout/xs", "base/rollout/uses"} <= set(state)
    b = gndm()
    b.load_state_dict(state)
    assert b.node == 0 and b.history == [[2, 0]] and b.base._reward_set.var == {"r": 0.25}
    assert torch.equal(b.base._roll["xs"], a.base._roll["xs"]) and b.base._roll["uses"] == 1
    assert b.base._roll["logs"] == {"x": 1.0} and b.base._roll["cond"] is None


def test_recording_folders_that_cannot_be_used_are_refused_in_one_line(tmp_path):
    from onestep.disback import RecordingError, _check_record_folder, open_recording

    (tmp_path / "file").write_text("x")
    with pytest.raises(RecordingError, match="record_dir: cannot create .*pass a writable folder"):
        _check_record_folder(str(tmp_path / "file" / "sub"))
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "index.json").write_text("{not json")
    with pytest.raises(RecordingError, match="is not a DisBack recording index"):
        open_recording(str(tmp_path / "rec"), {"teacher": "abc"})
    (tmp_path / "rec" / "index.json").write_text("[1, 2]")
    with pytest.raises(RecordingError, match="is not a DisBack recording index"):
        open_recording(str(tmp_path / "rec"), {"teacher": "abc"})

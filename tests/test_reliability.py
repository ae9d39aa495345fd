"""Reliability: crash-safe checkpoints, exact resume, kill -9 at random moments, and every bad input answered.

Bad inputs already covered by tests/test_cli.py (BAD_INPUTS, the offline hub teacher, an existing run folder,
non-finite losses) are not repeated here.
"""
import contextlib
import importlib.util
import io
import json
import os
import random
import re
import runpy
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from onestep import runs
from onestep.methods import METHODS
from onestep.methods.dmd import DMD2

pytestmark = pytest.mark.usefixtures("one_thread")

# The smoke preset with the GAN on (DMD2's defaults), so the real-image loader's position matters: class 0 only
# (142 digits) at batch 64 is 2 batches per epoch, and a resume lands mid-epoch. EMA, TTUR 2 and a cosine schedule
# with warm-up put every kind of saved state to use.
EXACT = ["--preset", "smoke", "--classes", "0", "--batch_size", "64", "--ema_decay", "0.9", "--update_ratio", "2",
         "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--classifier", "", "--export", "false",
         "--cpu_threads", "1"]


def distill_main():
    """train/distill.py's main(argv), for runs in this process."""
    spec = importlib.util.spec_from_file_location("distill_under_test", os.path.join(ROOT, "train", "distill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def leaves(obj):
    """The values of nested dicts and lists, depth first (an optimiser's per-parameter state)."""
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            yield from leaves(v)
    else:
        yield obj


def final_state(run_dir: str, step: int) -> dict:
    """Every tensor of a checkpoint: models and data position (safetensors), optimiser moments, EMA and method
    state (loaded with weights_only)."""
    from accelerate.utils import load

    folder = os.path.join(run_dir, "checkpoints", f"step_{step:07d}")
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update({f"{name}:{k}": v for k, v in load_file(os.path.join(folder, name)).items()})
        elif name.startswith("optimizer"):
            state = load(os.path.join(folder, name), map_location="cpu")["state"]
            out.update({f"{name}:{i}": t for i, t in enumerate(leaves(state))})
        elif name.startswith("custom_checkpoint_"):  # the EMA, or a method's own state
            state = load(os.path.join(folder, name), map_location="cpu")
            values = state["shadow_params"] if "shadow_params" in state else [torch.tensor(v) for v in state.values()]
            out.update({f"{name}:{i}": t for i, t in enumerate(values)})
    return out


@dataclass
class CountingDMD2(DMD2):
    """DMD2 that counts its generator turns: a method with its own state, which checkpoints must carry."""

    def __post_init__(self):
        super().__post_init__()
        self.turns = 0

    def generator_loss(self, triad, batch):
        self.turns += 1
        return super().generator_loss(triad, batch)

    def state_dict(self) -> dict:
        return {"turns": self.turns}

    def load_state_dict(self, state: dict) -> None:
        self.turns = int(state["turns"])


class Crash(Exception):
    pass


def straight_and_resumed(monkeypatch, args: list) -> tuple[str, str]:
    """Run `args` for 8 steps straight, and again with a crash right after the step-3 checkpoint and --resume latest:
    the two run folders."""
    main, out = distill_main(), args[args.index("--output_dir") + 1]
    main([*args, "--name", "straight"])

    save = runs.save_checkpoint

    def save_then_crash(accelerator, run_dir, step, *a, **k):
        out = save(accelerator, run_dir, step, *a, **k)
        if step == 3:
            raise Crash
        return out

    monkeypatch.setattr(runs, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        main([*args, "--name", "resumed"])
    monkeypatch.setattr(runs, "save_checkpoint", save)
    main([*args, "--name", "resumed", "--resume", "latest"])
    return os.path.join(out, "straight"), os.path.join(out, "resumed")


def test_resume_continues_the_same_trajectory(cond_teacher, tmp_path, monkeypatch):
    """8 steps straight == 3 steps, a crash right after the checkpoint, --resume latest, 5 more: identical tensors
    (models, EMA, optimiser moments, the method's own state)."""
    monkeypatch.setitem(METHODS, "dmd2", CountingDMD2)
    args = [*EXACT, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--steps", "8", "--checkpoint_every", "3",
            "--checkpoints_total_limit", "0"]
    straight_and_resumed(monkeypatch, args)
    position = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_0000003" / runs.DATA_STATE))
    assert int(position["offset"]) == 1  # 3 batches taken at 2 per epoch: mid-epoch

    a, b = final_state(str(tmp_path / "straight"), 8), final_state(str(tmp_path / "resumed"), 8)
    assert a.keys() == b.keys() and any(k.startswith("custom_checkpoint_0") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert int(b["custom_checkpoint_1.pkl:0"]) == 4  # generator turns at steps 0, 2, 4, 6: two of them after the crash
    gen = load_file(str(tmp_path / "straight" / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert any(not torch.equal(gen[k], a[f"model.safetensors:{k}"]) for k in gen)  # it did train after step 3
    config = (tmp_path / "resumed" / "config.yaml").read_text()
    with pytest.raises(runs.CheckpointError, match="steps: 2 is below the 8 iterations checkpoint step_0000008 holds"):
        distill_main()([*args, "--name", "resumed", "--resume", "latest", "--steps", "2"])  # a shorter run: refused
    assert (tmp_path / "resumed" / "config.yaml").read_text() == config


def test_gradient_accumulation_resumes_exactly(cond_teacher, tmp_path, monkeypatch):
    """--gradient_accumulation_steps 2 at batch 32: each iteration takes two real batches (6 after 3 iterations, mid
    epoch), and a crash after the step-3 checkpoint and --resume latest still give the straight run's tensors."""
    monkeypatch.setitem(METHODS, "dmd2", CountingDMD2)
    args = [*EXACT, "--batch_size", "32", "--gradient_accumulation_steps", "2", "--teacher", cond_teacher,
            "--output_dir", str(tmp_path), "--steps", "8", "--checkpoint_every", "3", "--checkpoints_total_limit", "0"]
    straight_and_resumed(monkeypatch, args)
    position = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_0000003" / runs.DATA_STATE))
    per_epoch = (load_digits_count(0) // 32)
    assert int(position["offset"]) == 6 % per_epoch != 0
    a, b = final_state(str(tmp_path / "straight"), 8), final_state(str(tmp_path / "resumed"), 8)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert int(b["custom_checkpoint_1.pkl:0"]) == 8  # 4 generator turns of 2 micro-batches each


def load_digits_count(label: int) -> int:
    from onestep.data import load_digits

    return int((load_digits("train")[1] == label).sum())


def test_lora_fake_score_checkpoints_hold_the_adapters_only_and_resume_exactly(cond_teacher, tmp_path, monkeypatch):
    """A LoRA fake score's checkpoint file keeps its adapters, not the teacher's weights under them, and a run
    resumed from it continues bit for bit (the teacher's weights come from the teacher)."""
    args = [*EXACT, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--steps", "8", "--checkpoint_every", "3",
            "--checkpoints_total_limit", "0", "--fake_score", "lora", "--lora_rank", "4"]
    straight_and_resumed(monkeypatch, args)
    folder = tmp_path / "straight" / "checkpoints" / "step_0000003"
    fake, gen = load_file(str(folder / "model_1.safetensors")), load_file(str(folder / "model.safetensors"))
    assert fake and all("lora_" in k for k in fake) and not any("lora_" in k for k in gen)
    assert (folder / "model_1.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size / 3
    a, b = final_state(str(tmp_path / "straight"), 8), final_state(str(tmp_path / "resumed"), 8)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any(not torch.equal(fake[k], a[f"model_1.safetensors:{k}"]) for k in fake)  # the adapters trained on


def test_lora_generator_checkpoints_hold_the_adapters_only_and_resume_exactly(cond_teacher, tmp_path, monkeypatch):
    """A LoRA generator over a LoRA fake score: both networks' checkpoint files keep their adapters only (with the
    EMA of the generator's adapters), and the resumed run equals the straight one; its export holds plain weights,
    the teacher's changed where the adapters sit."""
    args = [*EXACT, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--steps", "8", "--checkpoint_every", "3",
            "--checkpoints_total_limit", "0", "--fake_score", "lora", "--lora_rank", "4", "--generator_lora_rank", "4"]
    straight_and_resumed(monkeypatch, args)
    folder = tmp_path / "straight" / "checkpoints" / "step_0000003"
    gen, fake = load_file(str(folder / "model.safetensors")), load_file(str(folder / "model_1.safetensors"))
    assert gen and all(".lora_" in k and ".generator." in k for k in gen)
    assert fake and all(".lora_" in k and ".fake_score." in k for k in fake)
    a, b = final_state(str(tmp_path / "straight"), 8), final_state(str(tmp_path / "resumed"), 8)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert len([k for k in a if k.startswith("custom_checkpoint_0")]) == len(gen)  # the EMA: the adapters only
    main = distill_main()  # the same run exported: plain weights, trained where the adapters sit
    main([*args, "--name", "export", "--export", "true", "--steps", "4", "--checkpoint_every", "0"])  # (warm-up: lr 0 at first)
    exported = load_file(str(tmp_path / "export" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    teacher = load_file(os.path.join(cond_teacher, "unet", "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == teacher.keys()
    changed = {k for k in teacher if not torch.equal(exported[k], teacher[k])}
    assert changed and all(k.endswith(("conv1.weight", "conv2.weight", "to_q.weight", "to_k.weight", "to_v.weight",
                                       "to_out.0.weight")) for k in changed)


def brightness(images, cond):
    """A differentiable reward for GNDM runs here: mean intensity."""
    return images.mean(dim=(1, 2, 3))


def test_gndm_resume_carries_reward_scales_and_the_rollout_in_reuse(cond_teacher, tmp_path, monkeypatch):
    """GNDM with a two-step student reusing each rollout twice and a differentiable reward: its running reward
    variance and the half-used rollout at the step-3 checkpoint are in the checkpoint, so the resumed run equals
    the straight one."""
    from onestep.runs import unflatten_state

    args = [*EXACT, "--method", "gndm", "--update_ratio", "1", "--group_size", "4", "--generator_timesteps", "999,499",
            "--reuse", "2", "--rewards", "test_reliability:brightness", "--reward_gradient_weight", "0.1",
            "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--steps", "8", "--checkpoint_every", "3",
            "--checkpoints_total_limit", "0"]
    straight, resumed = straight_and_resumed(monkeypatch, args)
    from accelerate.utils import load

    saved = unflatten_state(load(os.path.join(resumed, "checkpoints", "step_0000003", "custom_checkpoint_1.pkl"),
                                 map_location="cpu"))
    assert saved["rollout"]["uses"] == 1 and saved["rollout"]["xs"].shape[0] == 2 and saved["reward_var"]
    a, b = final_state(straight, 8), final_state(resumed, 8)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_real_batches_resume_mid_epoch_replays_the_same_stream():
    """The loader's position: batches after a restore equal the uninterrupted stream, across epoch boundaries,
    and the global RNG stream is untouched by the replay."""
    data = torch.utils.data.TensorDataset(torch.arange(10.0))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, drop_last=True)  # 2 batches per epoch
    torch.manual_seed(0)
    stream = runs.RealBatches(loader)
    for _ in range(3):
        next(stream)
        torch.rand(5)  # training draws between batches
    state, live = stream.state_dict(), torch.get_rng_state()
    assert int(state["offset"]) == 1
    expected = [next(stream)[0] for _ in range(5)]
    after = torch.rand(3)

    torch.manual_seed(123)  # a fresh process: other RNG history
    restored = runs.RealBatches(loader)
    restored.load_state_dict(state)
    assert restored.state_dict().keys() == state.keys()  # saved again before a batch is taken: the same position
    torch.set_rng_state(live)
    got = [next(restored)[0] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(got, expected)) and torch.equal(torch.rand(3), after)
    torch.manual_seed(123)
    plain = runs.RealBatches(loader)
    assert not all(torch.equal(next(plain)[0], y) for y in expected[:2])  # the position is what makes them equal


@pytest.mark.parametrize("prepared", [False, True])
def test_uncaptioned_real_images_keep_their_prompts_across_a_resume(prepared):
    """Uncaptioned images of a text teacher draw a prompt per epoch from (seed, epoch): after a restore, in a process
    with another RNG history, the batches and their prompts equal the uninterrupted stream's, and epochs differ.
    prepared: the loader as accelerate prepares it, which tells the dataset its own epoch count when iterated."""
    from accelerate.data_loader import prepare_data_loader

    from onestep.data import RealImages

    def make_loader(dataset):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True)  # 3 batches/epoch
        return prepare_data_loader(loader, num_processes=1, process_index=0, put_on_device=False) if prepared else loader

    data = RealImages(torch.arange(12.0).reshape(12, 1, 1, 1), cond_table=torch.arange(5.0).reshape(5, 1) * 10, seed=3)
    loader = make_loader(data)
    torch.manual_seed(0)
    stream = runs.RealBatches(loader)
    for _ in range(4):
        next(stream)
        torch.rand(5)
    state, live = stream.state_dict(), torch.get_rng_state()
    assert int(state["epoch"]) == 1 and int(state["offset"]) == 1
    expected = [next(stream) for _ in range(6)]

    torch.manual_seed(123)
    fresh = RealImages(data.samples, cond_table=data.cond_table, seed=3)
    restored = runs.RealBatches(make_loader(fresh))
    restored.load_state_dict(state)
    torch.set_rng_state(live)
    got = [next(restored) for _ in range(6)]
    assert all(torch.equal(g[k], e[k]) for g, e in zip(got, expected) for k in ("real", "real_cond"))
    prompts = [{int(r): float(c) for r, c in zip(b["real"].flatten(), b["real_cond"].flatten())} for b in expected]
    epoch1, epoch2 = {**prompts[0], **prompts[1]}, {**prompts[2], **prompts[3], **prompts[4]}
    assert any(epoch1[i] != epoch2[i] for i in epoch1.keys() & epoch2.keys())  # a new draw each epoch
    assert len(set(epoch2.values())) > 1  # a prompt per image, not one per epoch


def _writes(ckpt_dir: str) -> set:
    """Checkpoint writes in progress (step_N.tmp folders), each identified by name, inode and creation time."""
    out = set()
    for n in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        with contextlib.suppress(FileNotFoundError):
            if n.endswith(".tmp"):
                st = os.stat(os.path.join(ckpt_dir, n))
                out.add((n, st.st_ino, st.st_ctime_ns))
    return out


def _wait_for_write(proc, ckpt_dir: str, skip: int, stale: set, timeout: float = 120.0) -> bool:
    """Poll until proc has begun its (skip+1)-th checkpoint write (stale: left by an earlier kill); False if it
    ended first."""
    seen, deadline = set(), time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        seen |= _writes(ckpt_dir) - stale
        if len(seen) > skip:
            return True
        time.sleep(0.001)
    return False


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_latest(cond_teacher, tmp_path):
    """5 trials of kill -9 (3 while a checkpoint is being written, 2 at a random moment of training), each followed
    by --resume latest: no checkpoint is ever lost or corrupt, the last run reaches the final step, and its weights
    are those of the same run never killed."""
    steps, rng = 40, random.Random(0)
    run = tmp_path / "k"
    ckpt_dir = str(run / "checkpoints")
    cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), "--preset", "smoke", "--teacher", cond_teacher,
           "--output_dir", str(tmp_path), "--name", "k", "--steps", str(steps), "--checkpoint_every", "1",
           "--checkpoints_total_limit", "2", "--classifier", "", "--export", "false", "--cpu_threads", "1",
           "--resume", "latest"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    last, interrupted_writes = 0, 0
    for trial, mode in enumerate(["write", "random", "write", "random", "write"]):
        with open(tmp_path / f"trial{trial}.log", "w") as log:
            stale = _writes(ckpt_dir)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            started = _wait_for_write(proc, ckpt_dir, rng.randint(0, 2) if mode == "write" else 0, stale)
            if mode == "random":
                time.sleep(rng.uniform(0.0, 0.8))
            proc.kill()  # SIGKILL
            proc.wait()
        assert started and proc.returncode == -9, (tmp_path / f"trial{trial}.log").read_text()[-2000:]
        names = os.listdir(ckpt_dir)
        interrupted_writes += any(n.endswith((".tmp", ".old")) for n in names)
        for d in runs.checkpoints(str(run)):  # every renamed checkpoint is complete and intact
            runs.verify_checkpoint(d)
        assert all(os.path.isfile(os.path.join(ckpt_dir, n, runs.MANIFEST)) for n in names if n[-4] != ".")
        with contextlib.redirect_stderr(io.StringIO()):
            latest = runs.resolve_resume(str(run), "latest")
        step = runs.verify_checkpoint(latest)["step"] if latest else 0  # killed before its first checkpoint
        assert step >= last, f"trial {trial}: the newest good checkpoint went back from step {last} to {step}"
        last = step
    assert interrupted_writes >= 1  # at least one kill landed inside a checkpoint write
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(rf"(\d+)/{steps}", done.stderr).group(1) == str(last)  # the bar starts at the newest good one
    assert json.loads((run / "metrics.json").read_text())["steps"] == steps
    final = runs.checkpoints(str(run))
    assert [os.path.basename(d) for d in final][-1] == f"step_{steps:07d}" and len(final) == 2
    for d in final:
        runs.verify_checkpoint(d)
    distill_main()([*cmd[2:cmd.index("--resume")], "--name", "straight"])  # the same run, never killed
    a, b = final_state(str(tmp_path / "straight"), steps), final_state(str(run), steps)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


# ---- checkpoint folder: verify, resolve, prune ----------------------------------------------------------------
@pytest.fixture
def tiny_run(tmp_path):
    """A real accelerate setup (one Linear, AdamW) and a save function into tmp_path/run."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)

    def save(step, keep=0, config=None):
        with torch.no_grad():
            model.weight.add_(1.0)
        return runs.save_checkpoint(acc, str(run), step, keep, config or {"seed": 0}, None)

    return run, save, acc


def test_latest_skips_corrupt_and_interrupted_checkpoints_with_a_warning(tiny_run, capsys):
    run, save, _ = tiny_run
    good = save(2)
    corrupt = save(4)
    with open(os.path.join(corrupt, "model.safetensors"), "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\0\1\2")
    no_manifest = save(8)
    os.remove(os.path.join(no_manifest, runs.MANIFEST))
    shutil.copytree(good, run / "checkpoints" / "step_0000006.tmp")  # a write killed before its rename
    capsys.readouterr()
    assert runs.resolve_resume(str(run), "latest") == good
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(err) == 3 and all(ln.startswith("warning: resume: skipping step_") for ln in err)
    assert "step_0000008: " in err[0] and "incomplete" in err[0]
    assert "step_0000006.tmp: an interrupted" in err[1]
    assert "step_0000004: " in err[2] and "model.safetensors does not match its sha256" in err[2]
    with pytest.raises(runs.CheckpointError, match="does not match its sha256"):
        runs.resolve_resume(str(run), corrupt)  # named explicitly: refused, not skipped


def test_a_crash_while_replacing_a_checkpoint_keeps_it(tiny_run):
    run, save, _ = tiny_run
    first = save(5)
    os.replace(first, first + ".old")  # killed between moving the old one aside and renaming the new one in
    shutil.copytree(first + ".old", first + ".tmp")
    assert runs.resolve_resume(str(run), "latest") == first + ".old"
    save(6)  # the next save puts it back and drops the unfinished write
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000005", "step_0000006"]


def test_a_crash_while_pruning_leaves_no_manifestless_checkpoint(tiny_run, capsys):
    run, save, _ = tiny_run
    first, second = save(2), save(3)
    os.replace(first, first + ".del")  # pruning renames first, then deletes: killed half-way through the deletion
    os.remove(os.path.join(first + ".del", runs.MANIFEST))
    capsys.readouterr()
    assert runs.resolve_resume(str(run), "latest") == second
    assert capsys.readouterr().err == ""  # a pruned checkpoint is not a candidate, so nothing to warn about
    save(4, keep=2)  # the next save finishes the deletion and prunes step 3 the same way
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000003", "step_0000004"]
    save(5, keep=2)
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000004", "step_0000005"]


def test_keep_last_n_never_deletes_the_only_good_checkpoint(tiny_run):
    run, save, _ = tiny_run
    save(2)
    later = save(9)  # from a run that was abandoned (resumed from an earlier checkpoint)
    shutil.rmtree(run / "checkpoints" / "step_0000002")
    with open(os.path.join(later, "model.safetensors"), "r+b") as f:
        f.write(b"junk")
    save(3, keep=1)  # a new run at step 3: step 9 is later and corrupt, step 3 is the one to keep
    assert runs.resolve_resume(str(run), "latest").endswith("step_0000003")
    for step in (4, 5, 6):
        save(step, keep=2)
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000005", "step_0000006", "step_0000009"]


def test_manifest_lists_step_config_hash_and_every_file(tiny_run):
    run, save, _ = tiny_run
    folder = save(7, config={"seed": 0, "lr_fake": 1e-3, "steps": 7, "method_args": {"update_ratio": 2}})
    m = json.loads(open(os.path.join(folder, runs.MANIFEST)).read())
    assert m["step"] == 7 and set(m["files"]) == set(os.listdir(folder)) - {runs.MANIFEST}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    same = runs.config_hash({"seed": 0, "lr_fake": 1e-3, "steps": 99, "method_args": {"update_ratio": 2}})
    assert m["config_hash"] == same  # steps is not part of the trajectory's identity (a run may be extended)
    assert runs.config_hash({"seed": 0, "lr_fake": 1e-3, "method_args": {"update_ratio": 3}}) != same


def test_pickle_files_in_a_checkpoint_are_refused_before_unpickling(tiny_run, tmp_path):
    run, save, _ = tiny_run
    folder = save(1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    custom = os.path.join(folder, "custom_checkpoint_0.pkl")
    torch.save({"x": Evil()}, custom)
    m = json.loads(open(os.path.join(folder, runs.MANIFEST)).read())  # a stranger's checkpoint: checksums match
    m["files"]["custom_checkpoint_0.pkl"] = {"bytes": os.path.getsize(custom), "sha256": runs.file_sha256(custom)}
    open(os.path.join(folder, runs.MANIFEST), "w").write(json.dumps(m))
    with pytest.raises(runs.CheckpointError, match="not plain tensors"):
        runs.verify_checkpoint(folder)
    assert not marker.exists()
    os.remove(custom)
    torch.save({"w": torch.zeros(1)}, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(runs.CheckpointError, match="pickle-based weights"):
        runs.verify_checkpoint(folder)


# ---- bad inputs: one line, exit status 2, before any training -------------------------------------------------
DISTILL = os.path.join(ROOT, "train", "distill.py")


def cli(args: list[str]) -> tuple[int, list[str]]:
    """`python train/distill.py ARGS`, in this process: its exit status and non-empty stderr lines."""
    err, argv = io.StringIO(), sys.argv
    sys.argv = [DISTILL, *args]
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            runpy.run_path(DISTILL, run_name="__main__")
    finally:
        sys.argv = argv
    return exit_.value.code, [ln for ln in err.getvalue().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def bad_things(tmp_path_factory, cond_teacher, uncond_teacher):
    """Broken teachers, files and checkpoints, by name, for the table below."""
    from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

    root = tmp_path_factory.mktemp("bad")
    p = {"cond": cond_teacher, "uncond": uncond_teacher, "marker": str(root / "remote-code-ran")}
    p["bin"] = str(root / "bin-teacher")
    shutil.copytree(uncond_teacher, p["bin"])
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(os.path.join(p["bin"], "unet"))
    shutil.rmtree(os.path.join(p["bin"], "unet"))
    unet.save_pretrained(os.path.join(p["bin"], "unet"), safe_serialization=False)  # pickle weights only
    p["custom"] = str(root / "custom-teacher")
    os.makedirs(os.path.join(p["custom"], "unet"))
    json.dump({"_class_name": "MyUNet", "sample_size": 8}, open(os.path.join(p["custom"], "unet", "config.json"), "w"))
    open(os.path.join(p["custom"], "unet", "my_unet.py"), "w").write(f"open({p['marker']!r}, 'w').close()\n")
    json.dump({"_class_name": "DiffusionPipeline", "unet": ["my_unet", "MyUNet"]},
              open(os.path.join(p["custom"], "model_index.json"), "w"))
    p["nosched"] = str(root / "no-scheduler")
    shutil.copytree(uncond_teacher, p["nosched"])
    shutil.rmtree(os.path.join(p["nosched"], "scheduler"))
    p["rgb"] = str(root / "rgb-teacher")
    from conftest import tiny_unet

    tiny_unet(None, channels=3).save_pretrained(os.path.join(p["rgb"], "unet"))
    DDPMScheduler().save_pretrained(os.path.join(p["rgb"], "scheduler"))
    p["classifier"] = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits-classifier")
    for name, scheduler in (("edm", EDMEulerScheduler()), ("flow", FlowMatchEulerDiscreteScheduler())):
        p[name] = str(root / f"{name}-teacher")  # the conditional teacher's weights under another schedule
        shutil.copytree(cond_teacher, p[name])
        shutil.rmtree(os.path.join(p[name], "scheduler"))
        scheduler.save_pretrained(os.path.join(p[name], "scheduler"))
    p["eleven"] = str(root / "no-onestep-json")  # 11 class rows, read as 11 classes
    shutil.copytree(cond_teacher, p["eleven"])
    os.remove(os.path.join(p["eleven"], "onestep.json"))
    p["empty"] = str(root / "empty")
    os.makedirs(p["empty"])
    p["file"] = str(root / "a-file")
    open(p["file"], "w").write("not a folder\n")
    p["badyaml"] = str(root / "bad.yaml")
    open(p["badyaml"], "w").write("steps: [1\n")
    p["listyaml"] = str(root / "list.yaml")
    open(p["listyaml"], "w").write("- steps\n- 3\n")
    p["namelist"] = str(root / "name.yaml")
    open(p["namelist"], "w").write("name: [a]\n")
    p["prompts"] = str(root / "prompts.txt")
    open(p["prompts"], "w").write("a digit\n")

    # a real checkpoint (2 smoke steps on the conditional teacher), and broken copies of it
    main = distill_main()
    main(["--preset", "smoke", "--teacher", cond_teacher, "--output_dir", str(root), "--name", "run", "--steps", "2",
          "--classifier", "", "--export", "false", "--cpu_threads", "1"])
    p["ckpt"] = ckpt = str(root / "run" / "checkpoints" / "step_0000002")
    for name in ("corrupt", "pickle", "nomanifest"):
        p[name] = str(root / name)
        shutil.copytree(ckpt, p[name])
    with open(os.path.join(p["corrupt"], "optimizer.bin"), "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    os.replace(os.path.join(p["pickle"], "model.safetensors"), os.path.join(p["pickle"], "pytorch_model.bin"))
    os.remove(os.path.join(p["nomanifest"], runs.MANIFEST))
    return p


BAD = [  # (id, arguments, what the one line must say); {name} is a path from bad_things
    ("batch_size", ["--batch_size", "0"], "batch_size: must be > 0, got 0"),
    ("accumulation", ["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps: must be > 0, got 0"),
    ("accumulation_reuse", ["--method", "gndm", "--generator_timesteps", "999,499", "--reuse", "2",
                            "--gradient_accumulation_steps", "2"], "the micro-batches of one update would share it"),
    ("accumulation_shared_pass", ["--shared_critic_pass", "true", "--gradient_accumulation_steps", "2"],
     "shared_critic_pass: the critic's backward would run on forwards of the generator turn"),
    ("generator_noise", ["--method", "sid", "--generator_noise", "both"], "generator_noise must be fresh or shared"),
    ("nan_lr", ["--lr_generator", "nan"], "lr_generator: must be a finite number, got nan"),
    ("log_every", ["--log_every", "0"], "log_every: must be > 0"),
    ("seed", ["--seed", "-1"], "seed: must be in 0..4294967295, got -1"),
    ("t_range", ["--t_min", "0.9", "--t_max", "0.1"], "t_min: must be <= t_max"),
    ("weight", ["--regression_weight", "-1"], "regression_weight: must be >= 0"),
    ("timesteps", ["--generator_timesteps", "-3"], "generator_timesteps: must be >= 0"),
    ("timesteps_range", ["--generator_timesteps", "5000"], "exceed this teacher's largest time 999"),
    ("steps_huge", ["--steps", "100000000000000000000"], "steps: must be at most 1e7"),
    ("name", ["--name", "../up"], "name: '../up' must be a plain folder name"),
    ("dataset_missing", ["--dataset", "/no/such/folder"], "dataset: '/no/such/folder' is not 'digits', 'none' or"),
    ("dataset_empty", ["--dataset", "{empty}"], "holds no images"),
    ("preset", ["--preset", "nope"], "preset: unknown preset 'nope'"),
    ("preset_twice", ["--preset", "smoke", "--preset", "digits"], "preset: given twice ('smoke', 'digits'); pass one"),
    ("preset_bare", ["--preset", "--steps", "3"], "preset: needs a value: --preset NAME"),
    ("config_twice", ["--config", "a.yaml", "--config", "b.yaml"], "config: given twice"),
    ("typo", ["--stpes", "3"], "unknown config key 'stpes' in the command line (did you mean steps?)"),
    ("steps_fraction", ["--steps", "2.5"], "steps: expected an integer, got '2.5'"),
    ("classes_fraction", ["--classes", "1.5"], "classes: expected integers, got 1.5"),
    ("config_missing", ["--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
    ("config_yaml", ["--config", "{badyaml}"], "is not valid YAML"),
    ("config_list", ["--config", "{listyaml}"], "must hold a mapping of keys to values"),
    ("bool", ["--overwrite", "maybe"], "overwrite: expected true or false, got 'maybe'"),
    ("positional", ["stray"], "unexpected argument 'stray'"),
    ("method_args", ["--method_args", "[1,2]"], "method_args: expected a mapping"),
    ("update_ratio", ["--update_ratio", "0"], "update_ratio: must be >= 1"),
    ("output_dir", ["--output_dir", "{file}"], "output_dir: cannot create the run folder"),
    ("pickle_teacher", ["--teacher", "{bin}"], "no .safetensors weights in"),
    ("remote_code_teacher", ["--teacher", "{custom}"], "teacher backbone 'MyUNet' is not supported"),
    ("no_scheduler", ["--teacher", "{nosched}"], "no scheduler config in"),
    ("classes_uncond", ["--teacher", "{uncond}", "--classes", "3"], "classes: this teacher has no class labels"),
    ("guidance_uncond", ["--teacher", "{uncond}", "--real_guidance_scale", "2"], "has no null condition"),
    ("channels", ["--teacher", "{rgb}"], "needs real images; this teacher makes (3, 8, 8)"),
    ("negative_prompt", ["--teacher", "{uncond}", "--negative_prompt", "blurry", "--real_guidance_scale", "2"],
     "is not a text-to-image model"),
    ("prompts", ["--teacher", "{uncond}", "--prompts", "{prompts}"], "is not a text-to-image model"),
    ("gan_layers", ["--gan_layers", "no_such_block"], "has no module 'no_such_block'"),
    ("resume_missing", ["--resume", "/no/such/step_1"], "is not a checkpoint folder"),
    ("resume_corrupt", ["--resume", "{corrupt}"], "optimizer.bin does not match its sha256"),
    ("resume_pickle", ["--resume", "{pickle}"], "pickle-based weights (pytorch_model.bin)"),
    ("resume_incomplete", ["--resume", "{nomanifest}"], "is incomplete (no onestep_manifest.json)"),
    ("resume_batch", ["--resume", "{ckpt}", "--batch_size", "16"], "other batch_size (8 there, 16 now)"),
    ("resume_teacher", ["--resume", "{ckpt}", "--teacher", "{uncond}"], "does not fit this run's networks"),
    ("loss_space", ["--method", "dmd", "--fake_loss_space", "foo"], "fake_loss_space: 'foo' is not one of auto,"),
    ("regression_batch", ["--method", "dmd", "--regression_weight", "0.25", "--regression_batch", "0"],
     "regression_batch: must be >= 1, got 0"),
    ("regression_steps", ["--method", "dmd", "--regression_weight", "0.25", "--regression_steps", "2000"],
     "regression_steps: 2000 sampler steps"),
    ("teacher_eval_steps", ["--teacher_eval_steps", "1000000"], "has 1000 timesteps, the most a DDIM sampler"),
    ("norm_eps", ["--norm_eps", "-1"], "norm_eps: must be > 0, got -1.0"),
    ("guidance", ["--real_guidance_scale", "-2"], "real_guidance_scale: must be >= 0, got -2.0"),
    ("eval_samples", ["--eval_samples", "1"], "eval_samples: FID needs at least 2 samples"),
    ("output_dir_empty", ["--output_dir", ""], "output_dir: empty"),
    ("preset_empty", ["--preset", ""], "preset: empty"),
    ("config_dir", ["--config", "{empty}"], "cannot be read as text (IsADirectoryError)"),
    ("lora_rank", ["--fake_score", "lora", "--lora_rank", "1000000000"], "lora_rank: at most 4096"),
    ("name_list", ["--config", "{namelist}"], "name: expected a string, got ['a']"),
    ("unused_lora", ["--fake_score", "copy", "--lora_rank", "8"], "lora_rank: only used with --fake_score lora"),
    ("unused_generator_lora", ["--generator_lora_targets", "to_q"],
     "generator_lora_targets: only used with --generator_lora_rank N"),
    ("generator_lora_targets", ["--generator_lora_rank", "4", "--generator_lora_targets", "no_such_module"],
     "none of the LoRA target modules ['no_such_module'] exist in the teacher"),
    ("generator_lora_students", ["--generator_lora_rank", "4", "--students", "2"],
     "generator_lora_rank: a LoRA generator trains on the teacher's own weights"),
    ("generator_lora_container", ["--generator_lora_rank", "4", "--generator_lora_targets", "down_blocks"],
     "LoRA target 'down_blocks' names down_blocks (ModuleList), not a linear, convolution or embedding layer"),
    ("generator_lora_negative", ["--generator_lora_rank", "-1"], "generator_lora_rank: must be >= 0, got -1"),
    ("unused_gan", ["--method", "dmd", "--gan_hidden", "64"], "gan_hidden: only used with a GAN"),
    ("unused_router", ["--router", "confusion"], "router: only used with --students K > 1"),
    ("unused_tsm", ["--tsm_steps", "5"], "tsm_steps: only used with --student_channels"),
    ("unused_backtrack", ["--record_interval", "5"], "record_interval: only used with --backtrack"),
    ("timesteps_order", ["--generator_timesteps", "499,999"], "generator_timesteps: a few-step student goes from noise"),
    ("timesteps_repeat", ["--generator_timesteps", "999,999"], "the times must fall strictly"),
    ("warmup", ["--lr_warmup_steps", "1000000"], "lr_warmup_steps: 1000000 is longer than the run"),
    ("random_guidance_uncond", ["--teacher", "{uncond}", "--method", "vsd", "--random_guidance", "true"],
     "random_guidance: this teacher has no null condition for guidance; use --random_guidance false"),
    ("unused_method_option", ["--method", "vsd", "--kappa_min", "2"], "kappa_min: only used with --random_guidance true"),
    ("unused_regression", ["--method", "dmd", "--regression_steps", "10"], "only used with --regression_weight > 0"),
    ("unused_negative_prompt", ["--negative_prompt", "blurry"], "negative_prompt: only used with guidance"),
    ("unused_plateau", ["--backtrack", "true", "--backtrack_nodes", "2", "--backtrack_interval", "1", "--backtrack_patience", "3"],
     "backtrack_patience: only used with --backtrack_switch plateau"),
    ("eval_every_no_classifier", ["--eval_every", "2"], "eval_every: FID during training needs the digits classifier"),
    ("classifier_rgb", ["--teacher", "{rgb}", "--classifier", "{classifier}"],
     "classifier: the digits classifier measures 1x8x8 digits and this teacher makes 3x8x8"),
    ("eval_every_rgb", ["--teacher", "{rgb}", "--eval_every", "2", "--classifier", "assets/digits-classifier"],
     "eval_every: the digits classifier measures 1x8x8 digits and this teacher makes 3x8x8"),
    ("sigma_init_flow", ["--teacher", "{flow}", "--method", "sid", "--sigma_init", "1.0"],
     "sigma_init: 1.0 is not used: this teacher is not an EDM one"),
    ("sigma_init_with_times", ["--teacher", "{edm}", "--method", "sid", "--sigma_init", "1.0", "--generator_timesteps",
                               "80"], "sigma_init: 1.0 is not used: --generator_timesteps sets the generator's times"),
    ("sigma_init_high", ["--teacher", "{edm}", "--method", "sid", "--sigma_init", "500"],
     "sigma_init: 500.0 exceeds this teacher's sigma_max 80.0"),
    ("timesteps_below_sigma_min", ["--teacher", "{edm}", "--generator_timesteps", "80,0"],
     "go below this teacher's smallest time, its sigma_min 0.002"),
    ("timesteps_flow_zero", ["--teacher", "{flow}", "--generator_timesteps", "0"], "smallest time, 0 (exclusive)"),
    ("eleven_classes", ["--teacher", "{eleven}", "--classifier", "{classifier}"],
     "the digits have classes 0-9 and this run's include 10"),
    ("eleven_classes_msd", ["--teacher", "{eleven}", "--classifier", "{classifier}", "--students", "2"],
     "the digits have classes 0-9 and this run's include 10"),
    ("teacher_eval_steps_no_fid", ["--teacher_eval_steps", "1"], "teacher_eval_steps: the teacher's FID is a digits-FID"),
    ("resume_schedule", ["--resume", "{ckpt}", "--teacher", "{flow}"],
     "other teacher_schedule ('vp:epsilon' there, 'flow:flow' now)"),
    ("sfd_students", ["--method", "sfd", "--forget", "3", "--students", "2"], "train SFD with --students 1"),
    ("record_foreign", ["--backtrack", "true", "--backtrack_nodes", "2", "--backtrack_interval", "1", "--record_dir", "{rgb}"],
     "holds files that are not a DisBack recording"),
]


@pytest.mark.parametrize("args,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gives_one_line_and_exit_2(args, message, bad_things, tmp_path):
    args = [a.format(**bad_things) for a in args]
    if "--teacher" not in args:
        args += ["--teacher", bad_things["cond"]]
    code, lines = cli([*(["--preset", "smoke"] if "--preset" not in args else []), "--output_dir", str(tmp_path),
                       "--classifier", "", "--cpu_threads", "1", *args])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not any(tmp_path.iterdir())  # stopped before the run was recorded; no empty run folder left
    assert not os.path.exists(bad_things["marker"])  # the custom model's code never ran


def test_other_teacher_families_run_from_another_folder_get_errors_that_name_the_fix(bad_things, tmp_path,
                                                                                      monkeypatch):
    """The user test's findings: outside the project folder the default classifier is still the default; the
    digits preset's generator time is named as the preset's on teachers whose times are other units."""
    monkeypatch.chdir(tmp_path)
    out = ["--output_dir", str(tmp_path / "o"), "--cpu_threads", "1"]
    code, lines = cli(["--teacher", bad_things["rgb"], *out])  # dmd2's GAN: the next check, not the classifier's
    assert code == 2 and "dataset: method 'dmd2' needs real images" in lines[-1], lines
    code, lines = cli(["--teacher", bad_things["edm"], *out])
    assert code == 2 and "[300] exceed this teacher's largest time 80.0 (the digits preset's value); this " \
        "teacher's times are noise levels sigma in [0.002, 80.0]" in lines[-1], lines
    code, lines = cli(["--teacher", bad_things["cond"], "--generator_timesteps", "500.5", *out])
    assert code == 2 and "[500.5] are not whole numbers; this teacher's times are whole timesteps" in lines[-1], lines
    code, lines = cli(["--method", "sid", "--fake_t", "generator", "--p_mean", "-1", *out])
    assert code == 2 and "p_mean: only used with --fake_t lognormal" in lines[-1], lines
    code, lines = cli(["--method", "sid", "--p_std", "1", *out])  # the digits teacher is VP: auto is not log-normal
    assert code == 2 and "p_std: not used: on this VP teacher fake_t auto draws" in lines[-1], lines
    if importlib.util.find_spec("torchsde") is None:  # a scheduler diffusers has but cannot build here
        sde = tmp_path / "sde"
        shutil.copytree(bad_things["cond"], sde)
        cfg = json.loads((sde / "scheduler" / "scheduler_config.json").read_text())
        (sde / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "_class_name": "DPMSolverSDEScheduler"}))
        code, lines = cli(["--teacher", str(sde), *out])
        assert code == 2 and len(lines) == 1 and "DPMSolverSDEScheduler requires the torchsde library" in lines[0], lines
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # no run folder left


def test_resume_with_changed_hyperparameters_or_process_count_warns_and_continues(bad_things, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(os.path.dirname(os.path.dirname(bad_things["ckpt"])), run)
    manifest = run / "checkpoints" / "step_0000002" / runs.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "processes": 2}))  # as if from 2-process DDP
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        distill_main()(["--preset", "smoke", "--teacher", bad_things["cond"], "--output_dir", str(tmp_path),
                        "--name", "run", "--steps", "3", "--lr_fake", "1e-3", "--classifier", "", "--export", "false",
                        "--cpu_threads", "1", "--resume", "latest"])
    warnings = [ln for ln in err.getvalue().splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and "lr_fake (0.0002 there, 0.001 now)" in warnings[0], warnings
    assert "written by 2 processes, this run has 1" in warnings[1]
    assert json.loads(open(run / "checkpoints" / "step_0000003" / runs.MANIFEST).read())["step"] == 3
    # the new learning rate is the one the optimiser ran with (accelerate's load put the saved one back); the LR
    # schedule written by "2 processes" (2 steps per iteration) is at the same iteration under 1: 2 // 2 + 1
    step3 = run / "checkpoints" / "step_0000003"
    fake = torch.load(step3 / "optimizer_1.bin", weights_only=True)["param_groups"][0]
    sched = torch.load(step3 / "scheduler_1.bin", weights_only=True)
    assert fake["lr"] == fake["initial_lr"] == 1e-3 and sched["base_lrs"] == [1e-3] and sched["last_epoch"] == 2
    # more iterations under a decaying LR schedule: its curve is laid over the new length, and the warning says so
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        distill_main()(["--preset", "smoke", "--teacher", bad_things["cond"], "--output_dir", str(tmp_path),
                        "--name", "run", "--steps", "4", "--lr_fake", "1e-3", "--classifier", "", "--export", "false",
                        "--cpu_threads", "1", "--resume", "latest", "--lr_scheduler", "cosine"])
    warnings = [ln for ln in err.getvalue().splitlines() if ln.startswith("warning:")]
    assert any("--steps 4 (the checkpoint's run had 3): the cosine learning-rate schedule is laid over the new "
               "length" in w for w in warnings), warnings

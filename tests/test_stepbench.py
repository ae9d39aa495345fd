"""The step benchmark and the step's economy: one generator forward per iteration, what each step trains."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_triad_methods import batch, make_triad, snapshot

from onestep.methods import build_method
from onestep.stepbench import StepRunner, build_workload

pytestmark = pytest.mark.usefixtures("one_thread")


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("options", [dict(method="dmd2"), dict(method="dmd", regression_weight=0.5, regression_pairs=8,
                                                                regression_steps=2, regression_batch=4),
                                     dict(method="dmd2", shared_critic_pass=True), dict(method="vsd")])
def test_generator_runs_once_per_iteration(options):
    """The generator output is computed once and reused by every term: DM, GAN or regression, and the critic turn."""
    options = dict(options)
    name = options.pop("method")
    triad = make_triad(gan=name == "dmd2")
    method = build_method(name, **options)
    if name == "dmd":
        method.prepare(triad, lambda n, generator=None: torch.randint(0, 10, (n,), generator=generator), (1, 8, 8), "cpu")
    calls = count_calls(triad.raw("generator").denoiser.backbone)
    b = batch()
    method.generator_loss(triad, b)[0].backward()
    method.fake_score_loss(triad, b)[0].backward()
    assert len(calls) == 1
    b.pop("generated")
    method.fake_score_loss(triad, b)  # a critic-only iteration (update_ratio > 1) draws its own samples
    assert len(calls) == 2


@pytest.mark.parametrize("method", ["dmd", "dmd2"])
def test_benchmark_step_trains_generator_and_fake_score_only(method):
    work = build_workload("digits", torch.device("cpu"), batch_size=4)
    runner = StepRunner(work, "fp32", torch.device("cpu"), method=method)
    roles = ("generator", "fake_score", "teacher") + (("gan_head",) if method == "dmd2" else ())
    before = {r: snapshot(runner.triad.raw(r)) for r in roles}
    runner.step()  # DMD's first generator gradient is zero: the fake score starts as the teacher's copy
    runner.step()
    assert (runner.triad.raw("gan_head") is not None) == (method == "dmd2")
    for role, changed in (("generator", True), ("fake_score", True), ("teacher", False), ("gan_head", True))[:len(roles)]:
        after = snapshot(runner.triad.raw(role))
        same = all(torch.equal(before[role][k], v) for k, v in after.items())
        assert same != changed, role
    assert set(runner.passes()) == {"generator fwd+bwd", "teacher fwd", "fake fwd", "fake fwd+bwd"}


def run_cli(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval", "step_benchmark.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_rows_with_flops_and_step_over_passes(tmp_path):
    out = tmp_path / "rows.json"
    r = run_cli("--batch-size", "4", "--repeats", "2", "--warmup", "1", "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(out.read_text())[0]
    assert row["preset"] == "digits" and row["variant"] == "fp32" and row["img_per_s"] > 0
    assert row["gflop_per_step"] > 0 and row["tflops"] > 0
    assert row["back_to_back_img_per_s"] == pytest.approx(4 / row["back_to_back_step_s"]) and row["back_to_back_step_s"] > 0
    assert row["host_syncs_per_step"] is None  # counted on CUDA devices only
    assert set(row["passes_s"]) == {"generator fwd+bwd", "teacher fwd", "fake fwd", "fake fwd+bwd"}
    assert row["step_over_passes"] == pytest.approx(row["step_s"] / sum(row["passes_s"].values()))
    assert "| digits | DMD | fp32 | copy fake score, sdpa | cpu | 4 |" in r.stdout


def test_cli_option_lists_give_a_row_each(tmp_path):
    out = tmp_path / "rows.json"
    r = run_cli("--batch-size", "2", "--repeats", "1", "--warmup", "1", "--threads", "1", "--no-components",
                "--fake-score", "copy,lora", "--ema", "on,off", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(x["fake_score"], x["ema"]) for x in rows] == [("copy", True), ("copy", False), ("lora", True), ("lora", False)]
    assert rows[0]["gflop_per_step"] == pytest.approx(rows[1]["gflop_per_step"])
    assert "lora fake score, no EMA, sdpa" in r.stdout


def test_cli_sync_modes_give_a_row_each(tmp_path):
    """--sync: the trainer's update rule read on the host, decided on the device, or with the loss terms read each
    turn (the before of that change) in one run; the default row says which one auto picked."""
    out = tmp_path / "rows.json"
    r = run_cli("--batch-size", "2", "--repeats", "1", "--warmup", "1", "--threads", "1", "--no-components",
                "--sync", "auto,logs,host,device", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(x["sync_option"], x["sync"]) for x in rows] == [("auto", "host"), ("logs", "logs"), ("host", "host"),
                                                              ("device", "device")]
    assert "sdpa, logs read per turn |" in r.stdout and "sdpa, device-side skip |" in r.stdout
    assert "copy fake score, sdpa | cpu" in r.stdout  # auto: no label


def test_cli_shared_critic_pass_row_saves_one_forward_in_eight(tmp_path):
    """--critic-pass separate,shared: the shared row's iteration costs 7 forward-equivalents instead of 8 (torch's flop
    counter), and its passes alone leave out the fake score's separate forward."""
    out = tmp_path / "rows.json"
    r = run_cli("--batch-size", "2", "--repeats", "1", "--warmup", "1", "--threads", "1", "--critic-pass",
                "separate,shared", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    separate, shared = json.loads(out.read_text())
    assert (separate["shared_critic_pass"], shared["shared_critic_pass"]) == (False, True)
    assert shared["gflop_per_step"] / separate["gflop_per_step"] == pytest.approx(7 / 8, rel=1e-3)
    assert set(shared["passes_s"]) == {"generator fwd+bwd", "teacher fwd", "fake fwd+bwd"}
    assert "copy fake score, sdpa, shared critic pass | cpu" in r.stdout


@pytest.mark.parametrize("args,needle", [(["--preset", "imagenet"], "unknown preset"),
                                         (["--critic-pass", "both"], "unknown value 'both'"),
                                         (["--variants", "bf16"], "needs a CUDA device"),
                                         (["--repeats", "0"], "--repeats"),
                                         (["--fake-score", "full"], "unknown value 'full'"),
                                         (["--attention", "xformers"], "needs a CUDA device")])
def test_cli_bad_input_one_line(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_memory_options_reach_the_benchmark_row():
    """--optimizer adamw8bit and --ema offload build what the trainer builds: quantised moments, a CPU-side EMA."""
    from onestep.stepbench import markdown, measure

    work = build_workload("digits", torch.device("cpu"), batch_size=2)
    rows = [measure(work, "fp32", torch.device("cpu"), warmup=1, repeats=1, optimizer=o, ema=e, flops=1.0)
            for o, e in (("adamw", True), ("adamw8bit", "offload"), ("adamw", False))]
    assert rows[1]["optimizer_state_gib"] < 0.3 * rows[0]["optimizer_state_gib"]
    assert [r["ema_device"] for r in rows] == ["cpu", "cpu", None] and rows[1]["ema"] == "offload"
    assert "EMA on CPU, 8-bit AdamW" in markdown(rows[1:2])


def test_cli_without_bitsandbytes_refuses_adamw8bit_before_measuring(tmp_path):
    """A bitsandbytes that fails to import (shadowed on PYTHONPATH): one line naming the package, no row measured."""
    (tmp_path / "bitsandbytes").mkdir()
    (tmp_path / "bitsandbytes" / "__init__.py").write_text("raise ImportError('not installed')\n")
    r = run_cli("--optimizer", "adamw,adamw8bit", "--repeats", "1", "--warmup", "1",
                env_extra={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: optimizer: 'adamw8bit' needs bitsandbytes: pip install bitsandbytes (or --optimizer adamw)"]
    assert "{" not in r.stdout

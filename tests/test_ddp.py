"""The trainer runs unchanged as 2-process DDP on CPU (gloo) and the replicas end with the same weights."""
import json
import os
import subprocess

import pytest
from conftest import ROOT, launch_cmd, run_distill


@pytest.mark.slow
def test_two_process_ddp_run_agrees_on_weights(cond_teacher, tmp_path):
    r = run_distill(["--preset", "smoke", "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "ddp"],
                    env_extra={"ACCELERATE_USE_CPU": "1"}, launcher=["--multi_gpu", "--num_processes", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["processes"] == 2
    assert m["replica_weight_spread"] == 0.0  # gradients were synchronised: both replicas hold the same generator
    assert (tmp_path / "ddp" / "pipeline" / "model_index.json").exists()
    # bad input under 2 processes: one line (the first process's), and no process waits for one that stopped
    again = run_distill(["--preset", "smoke", "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "ddp"],
                        env_extra={"ACCELERATE_USE_CPU": "1"}, launcher=["--multi_gpu", "--num_processes", "2"])
    errors = [ln for ln in again.stderr.splitlines() if ln.startswith("error:")]
    assert again.returncode != 0 and len(errors) == 1 and "already holds a run" in errors[0], again.stderr[-3000:]
    assert "exitcode: 2" in again.stderr and "Connection closed" not in again.stderr and "RuntimeError" not in again.stderr


def test_processes_accelerate_did_not_join_are_refused(cond_teacher, tmp_path):
    """`accelerate launch --multi_gpu` on CPUs without ACCELERATE_USE_CPU=1 starts processes that each run alone:
    refused in one line, before any run folder is made."""
    r = run_distill(["--preset", "smoke", "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "x"],
                    env_extra={"ACCELERATE_USE_CPU": "false", "CUDA_VISIBLE_DEVICES": ""},
                    launcher=["--multi_gpu", "--num_processes", "2"])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "did not join into one run" in errors[0], r.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=1" in errors[0] and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_ddp_step_equals_one_process_step_on_the_same_global_batch(tmp_path):
    """Gradients are synchronised (averaged): a 2-process DMD2 iteration (generator and critic turns, GAN on) gives the
    weights one process gets from the same global batch; so does one with two accumulated micro-batches per process."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = launch_cmd("--multi_gpu", "--num_processes", "2", os.path.join(ROOT, "tests", "ddp_step.py"), str(tmp_path))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "ddp_step.json").read_text())
    for role in ("generator", "critic", "accumulated_generator", "accumulated_critic"):
        assert rep[f"{role}_replica_spread"] == 0.0
        assert rep[f"{role}_update_size"] > 1e-4  # the step moved the weights ...
        assert rep[f"{role}_vs_single_process"] < 1e-3 * rep[f"{role}_update_size"]  # ... as one process would

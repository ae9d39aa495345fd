"""The trainer runs unchanged as 2-process DDP on CPU (gloo) and the replicas end with the same weights."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_distill


@pytest.mark.slow
def test_two_process_ddp_run_agrees_on_weights(cond_teacher, tmp_path):
    r = run_distill(["--preset", "smoke", "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "ddp"],
                    env_extra={"ACCELERATE_USE_CPU": "1"}, launcher=["--multi_gpu", "--num_processes", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["processes"] == 2
    assert m["replica_weight_spread"] == 0.0  # gradients were synchronised: both replicas hold the same generator
    assert (tmp_path / "ddp" / "pipeline" / "model_index.json").exists()


@pytest.mark.slow
def test_ddp_step_equals_one_process_step_on_the_same_global_batch(tmp_path):
    """Gradients are synchronised (averaged): a 2-process DMD2 iteration (generator and critic turns, GAN on) gives the
    weights one process gets from the same global batch."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           os.path.join(ROOT, "tests", "ddp_step.py"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "ddp_step.json").read_text())
    for role in ("generator", "critic"):
        assert rep[f"{role}_replica_spread"] == 0.0
        assert rep[f"{role}_update_size"] > 1e-4  # the step moved the weights ...
        assert rep[f"{role}_vs_single_process"] < 1e-3 * rep[f"{role}_update_size"]  # ... as one process would

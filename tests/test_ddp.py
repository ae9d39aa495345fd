"""The trainer runs unchanged as 2-process DDP on CPU (gloo) and the replicas end with the same weights."""
import json

import pytest
from conftest import run_distill


@pytest.mark.slow
def test_two_process_ddp_run_agrees_on_weights(cond_teacher, tmp_path):
    r = run_distill(["--preset", "smoke", "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--name", "ddp"],
                    env_extra={"ACCELERATE_USE_CPU": "1"}, launcher=["--multi_gpu", "--num_processes", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["processes"] == 2
    assert m["replica_weight_spread"] == 0.0  # gradients were synchronised: both replicas hold the same generator
    assert (tmp_path / "ddp" / "pipeline" / "model_index.json").exists()

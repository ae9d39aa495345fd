"""FSDP2 through accelerate (train/accelerate/fsdp.yaml), run on 2 CPU processes over gloo (tests/fsdp_cpu.py): the
sharded run trains what DDP trains, resumes exactly, exports full weights; what it cannot shard is refused."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, launch_cmd, run_distill
from packaging.version import Version
from safetensors.torch import load_file

from onestep.distributed import FSDP2_TORCH

FSDP = ["--config_file", os.path.join(ROOT, "train", "accelerate", "fsdp.yaml")]
# accelerate's FSDP2 needs torch >= 2.6; on an older torch the trainer refuses the launch (test_old_torch_...)
fsdp2 = pytest.mark.skipif(Version(torch.__version__).release[:2] < FSDP2_TORCH, reason="FSDP2 needs torch >= 2.6")
SMOKE = ["--preset", "smoke", "--ema_decay", "0.9", "--checkpoint_every", "3", "--sample_every", "3", "--eval_every", "3"]


def run_fsdp(args: list[str], processes: int = 2, precision: str = "no", timeout: int = 600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = launch_cmd(*FSDP, "--mixed_precision", precision, "--num_processes", str(processes),
                     os.path.join(ROOT, "tests", "fsdp_cpu.py"), os.path.join(ROOT, "train", "distill.py"), *args)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def exported(run) -> dict:
    return load_file(glob.glob(os.path.join(run, "pipeline", "unet", "*.safetensors"))[0])


def relative_gap(a: dict, b: dict, start: dict) -> float:
    """|a - b| over |b - start| (the size of the training update), over all weights."""
    gap = sum((a[k].double() - b[k].double()).square().sum() for k in b).sqrt()
    update = sum((b[k].double() - start[k].double()).square().sum() for k in b).sqrt()
    return (gap / update).item()


@fsdp2
@pytest.mark.slow
def test_fsdp_run_trains_as_ddp_does_and_resumes_exactly(tmp_path):
    out = ["--output_dir", str(tmp_path), *SMOKE]  # the shipped digits teacher (a random tiny one's near-zero gradients
    # turn summation-order noise into sign flips of Adam's first updates)
    # the skip of non-finite updates decided on the device here (fused AdamW's found_inf on sharded parameters) and
    # on the host in the resumed runs below, which must end on the same weights
    r = run_fsdp([*out, "--name", "fsdp", "--steps", "6", "--nonfinite_check", "device"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_distill([*out, "--name", "ddp", "--steps", "6"], env_extra={"ACCELERATE_USE_CPU": "1"},
                    launcher=["--multi_gpu", "--num_processes", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "fsdp"
    m = json.loads((run / "metrics.json").read_text())
    assert m["distributed"] == "FSDP" and m["processes"] == 2 and m["replica_weight_spread"] is None
    assert len(m["curve"]) == 2 and m["student"]["fid"] is not None  # FID at step 3 (gathered weights) and at the end
    assert (run / "samples" / "step_0000003.png").exists() and (run / "samples" / "step_0000006.png").exists()
    files = os.listdir(run / "checkpoints" / "step_0000006")
    assert {"pytorch_model_fsdp.bin", "pytorch_model_fsdp_1.bin", "pytorch_model_fsdp_2.bin",  # generator, fake, head
            "custom_checkpoint_0.pkl"} <= set(files)  # ... and the EMA, saved as full tensors
    teacher = load_file(os.path.join(ROOT, "assets", "digits-teacher", "unet", "diffusion_pytorch_model.safetensors"))
    fsdp, ddp = exported(run), exported(tmp_path / "ddp")
    assert relative_gap(fsdp, ddp, teacher) < 1e-3  # the same training (summation order aside)

    r = run_fsdp([*out, "--name", "resumed", "--steps", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_fsdp([*out, "--name", "resumed", "--steps", "6", "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = exported(tmp_path / "resumed")
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)  # weights, EMA, optimisers, RNG: as if never stopped
    # (and the device-side and host-side skip checks train alike)


@fsdp2
@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--method", "vsd", "--fake_score", "copy"], ["--fake_score", "lora", "--ema_decay", "0.9"],
                                   ["--fake_score", "lora", "--shared_critic_pass", "true", "--gradient_checkpointing", "true"],
                                   ["--gradient_accumulation_steps", "2"],
                                   ["--fake_score", "lora", "--gradient_accumulation_steps", "2"]],
                         ids=["vsd-copy", "dmd2-lora", "dmd2-lora-shared-critic-pass", "dmd2-accumulation",
                              "dmd2-lora-accumulation"])
def test_fsdp_frozen_and_lora_fake_scores_train_as_ddp_does(tmp_path, flags):
    """VSD calls the fake score frozen under no_grad: FSDP2 keeps a root's gathered weights after a no-grad forward,
    with the requires_grad they were gathered with; the triad regathers after each toggle, so the critic turn trains
    the whole fake score (else its root-level weights stayed frozen: a relative gap of 0.36). A LoRA fake score shards
    the backbone it shares with the teacher: both views gather it, the teacher's weights never change. With
    shared_critic_pass the critic's backward runs on a forward of the generator turn, past its backward, the GAN
    term's freeze of the fake score and the regathers (with checkpointing: recomputed there). With gradient
    accumulation the micro-batches before the last leave their gradients unreduced (FSDP2's requires_gradient_sync)."""
    out = ["--output_dir", str(tmp_path), "--preset", "smoke", "--steps", "4", *flags]
    r = run_fsdp([*out, "--name", "fsdp"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_distill([*out, "--name", "ddp"], env_extra={"ACCELERATE_USE_CPU": "1"},
                    launcher=["--multi_gpu", "--num_processes", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    teacher = load_file(os.path.join(ROOT, "assets", "digits-teacher", "unet", "diffusion_pytorch_model.safetensors"))
    assert relative_gap(exported(tmp_path / "fsdp"), exported(tmp_path / "ddp"), teacher) < 1e-3
    if "lora" in flags:  # the fake score's checkpoint: the shared backbone, base weights still the teacher's
        fake = torch.load(tmp_path / "fsdp" / "checkpoints" / "step_0000004" / "pytorch_model_fsdp_1.bin", weights_only=True)
        def base(k):  # peft keeps a wrapped layer's own weights under base_layer
            head, _, leaf = k.rpartition(".")
            return k if k in fake else f"{head}.base_layer.{leaf}"

        assert all(torch.equal(fake[base(k)], v) for k, v in teacher.items())
        assert any("lora_B" in k and fake[k].abs().max() > 0 for k in fake)  # the adapters trained


@fsdp2
@pytest.mark.slow
def test_fsdp_bf16_vsd_with_a_lora_fake_score_trains_the_adapters_only(tmp_path):
    """bf16 through FSDP2's MixedPrecisionPolicy. VSD's first backbone forward is a frozen one; the trainer settles
    FSDP2 before it, so gradients reach the float32 LoRA weights as float32 (else the first backward fails: 'attempting
    to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float')."""
    r = run_fsdp(["--output_dir", str(tmp_path), "--preset", "smoke", "--method", "vsd", "--fake_score", "lora",
                  "--steps", "2", "--checkpoint_every", "2", "--name", "bf16"], precision="bf16")
    assert r.returncode == 0, r.stderr[-3000:]
    fake = torch.load(tmp_path / "bf16" / "checkpoints" / "step_0000002" / "pytorch_model_fsdp_1.bin", weights_only=True)
    lora = {k: v for k, v in fake.items() if "lora_" in k}
    assert lora and all(v.dtype == torch.float32 for v in lora.values())  # master weights stay float32
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())  # and they trained


@fsdp2
@pytest.mark.slow
def test_fsdp_sd_dmd2_run_trains_as_ddp_does(tmp_path):
    from test_sd import PROMPTS, save_tiny_sd

    sd = save_tiny_sd(str(tmp_path / "tiny-sd"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = ["--preset", "sd15-dmd2", "--teacher", sd, "--prompts", str(prompts), "--steps", "4", "--batch_size", "2",
           "--update_ratio", "2", "--ema_decay", "0.9", "--sample_every", "2", "--checkpoint_every", "2",
           "--output_dir", str(tmp_path)]
    r = run_fsdp([*out, "--name", "fsdp"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_distill([*out, "--name", "ddp"], env_extra={"ACCELERATE_USE_CPU": "1"},
                    launcher=["--multi_gpu", "--num_processes", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    teacher = load_file(os.path.join(sd, "unet", "diffusion_pytorch_model.safetensors"))
    assert relative_gap(exported(tmp_path / "fsdp"), exported(tmp_path / "ddp"), teacher) < 1e-3
    assert (tmp_path / "fsdp" / "pipeline" / "text_encoder").is_dir()  # a full pipeline folder, as a DDP run writes


@fsdp2
@pytest.mark.parametrize("flags, env, message", [
    (["--backtrack", "true", "--backtrack_nodes", "2", "--backtrack_interval", "1"], {}, "FSDP does not support --backtrack"),
    (["--ema_decay", "0.9", "--offload_ema", "true"], {}, "FSDP does not support --offload_ema"),
    (["--generator_lora_rank", "4"], {}, "FSDP does not support --generator_lora_rank"),
    ([], {"FSDP_VERSION": "1"}, "FSDP version 1 is not supported"),
    ([], {"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "use TRANSFORMER_BASED_WRAP"),
    (["--students", "2", "--shared_fake_score"], {}, "shared_fake_score: the routed students are not sharded"),
])
def test_fsdp_refuses_what_it_cannot_shard_in_one_line(cond_teacher, tmp_path, flags, env, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true",  # as fsdp.yaml
           "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", **env}
    cmd = [sys.executable, os.path.join(ROOT, "tests", "fsdp_cpu.py"), os.path.join(ROOT, "train", "distill.py"),
           "--preset", "smoke", "--teacher", cond_teacher, "--output_dir", str(tmp_path), *flags]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]  # nothing written


def test_old_torch_is_refused_before_accelerate_raises(monkeypatch):
    """accelerate raises an ImportError from inside Accelerator() for FSDP2 on torch < 2.6: one line instead."""
    from onestep.config import ConfigError
    from onestep.distributed import check_launch

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match=r"FSDP2 needs torch >= 2\.6 \(this is 2\.4\.1\+cu121\); upgrade torch or"):
        check_launch("2.4.1+cu121")
    check_launch("2.6.0")
    check_launch("2.14.1+cu130")
    monkeypatch.setenv("FSDP_VERSION", "1")  # refused later, by distributed_mode, with its own line
    check_launch("2.4.1")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_launch("2.4.1")

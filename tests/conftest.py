"""Shared fixtures: tiny real diffusers teachers built from configs and saved as model folders."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# two threads for the in-process tests; one each where pytest-xdist runs them in parallel (the README's command)
torch.set_num_threads(1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2)


def free_port() -> str:
    """A free local port for a launch's rendezvous: launches from parallel test workers must not share 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch_cmd(*args: str) -> list[str]:
    """`accelerate launch ARGS` with its own rendezvous port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", free_port(), *args]


@pytest.fixture(autouse=True)
def autograd_left_on():
    """A test (e.g. a script's main() run in this process) must not switch autograd off for the tests after it."""
    yield
    on = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # the next tests run with it either way
    assert on, "this test left autograd switched off (torch.set_grad_enabled(False))"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one thread is faster, and immune to a busy machine (idle OpenMP threads wait per op).
    Use per module: pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(num_class_embeds: int | None = 11, channels: int = 1, size: int = 8, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       num_class_embeds=num_class_embeds)


def save_teacher(path: str, conditional: bool = True, prediction_type: str = "epsilon") -> str:
    unet = tiny_unet(11 if conditional else None)
    unet.save_pretrained(os.path.join(path, "unet"))
    DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False).save_pretrained(
        os.path.join(path, "scheduler"))
    if conditional:
        with open(os.path.join(path, "onestep.json"), "w") as f:
            json.dump({"num_classes": 10, "null_class": 10}, f)
    return path


@pytest.fixture(scope="session")
def cond_teacher(tmp_path_factory) -> str:
    return save_teacher(str(tmp_path_factory.mktemp("cond-teacher")), conditional=True)


@pytest.fixture(scope="session")
def uncond_teacher(tmp_path_factory) -> str:
    return save_teacher(str(tmp_path_factory.mktemp("uncond-teacher")), conditional=False)


def run_distill(args: list[str], env_extra: dict | None = None, launcher: list[str] | None = None, timeout: int = 600):
    """Run `accelerate launch train/distill.py ARGS` as a user would; returns the CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = launch_cmd(*(launcher or ["--num_processes", "1"]), os.path.join(ROOT, "train", "distill.py"), *args)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

"""Peak-memory simulation (onestep/memsim.py): exact byte counts on fake tensors, CUDA's autocast rules, the step
benchmark's simulated rows, and that nothing of the simulation outlives it."""
import subprocess
import sys

import pytest
import torch

from onestep.memsim import MemoryTracker, cuda_autocast_rules, simulated_accelerator
from onestep.stepbench import StepBenchError, simulate_memory

MiB = 2**20


def test_tracker_counts_every_live_storage_exactly():
    with simulated_accelerator() as mem:
        assert mem.current == 0
        lin = torch.nn.Linear(1024, 256)
        params = (1024 * 256 + 256) * 4
        assert mem.current == params
        x = torch.randn(512, 1024)  # 2 MiB
        y = lin(x)  # 0.5 MiB
        v = y.view(256, 512)  # a view: no new storage
        assert mem.current == params + 2 * MiB + MiB // 2
        del y, v
        assert mem.current == params + 2 * MiB
        mem.reset_peak()
        z = x * 2  # 2 MiB more, then freed
        del z
        assert mem.peak == params + 4 * MiB and mem.current == params + 2 * MiB
        with mem.host_allocations():
            h = torch.empty(1024, 1024)  # host memory on the real machine
        assert mem.current == params + 2 * MiB
        mem.host_resident([x])
        assert mem.current == params
        assert isinstance(h, torch.Tensor) and x.sum() is not None  # host tensors stay usable
        assert isinstance(mem, MemoryTracker) and float(x.sum()) == 1.0  # a host read: no data, a stand-in value


def test_backward_and_optimizer_state_are_counted():
    with simulated_accelerator() as mem:
        lin = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB of weights
        opt = torch.optim.AdamW(lin.parameters(), fused=True)
        lin(torch.randn(8, 1024)).square().mean().backward()
        assert lin.weight.grad is not None
        opt.step()
        opt.zero_grad(set_to_none=True)
        # weights + two float32 moments + the step count (a 0-dim float32 tensor); no gradient, no activation
        assert mem.current == 3 * 4 * MiB + 4


def test_cuda_autocast_rules_apply_inside_and_are_removed_after():
    x = torch.randn(2, 8, 4, 4)
    conv = torch.nn.Conv2d(8, 8, 3)

    def dtypes():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
            return (y.dtype, torch.nn.functional.group_norm(y, 4).dtype,
                    torch.nn.functional.interpolate(y, scale_factor=2.0).dtype, y.sum().dtype, y.softmax(1).dtype,
                    y.sum(dtype=torch.bfloat16).dtype, (y ** 2).dtype, y.mean().dtype)

    bf, f32 = torch.bfloat16, torch.float32
    before = dtypes()
    with cuda_autocast_rules():  # as on a GPU: normalisation, upsampling, pow in float32; sum/softmax return float32
        assert dtypes() == (bf, f32, f32, f32, f32, bf, f32, bf)
    assert dtypes() == before
    assert before[1] == bf  # the CPU's own rule (so the test above shows CUDA's)


def test_simulation_restores_global_state():
    swap, pin = torch.utils.swap_tensors, torch.Tensor.pin_memory
    with simulated_accelerator():
        torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert torch.utils.swap_tensors is swap and torch.Tensor.pin_memory is pin
    t = torch.ones(3)
    assert type(t) is torch.Tensor and t.sum().item() == 3.0


def _phases(row):
    return row["phase_peak_gib"]


def test_simulated_step_counts_the_triads_state():
    """cifar preset: the bf16 frozen teacher, float32 generator / fake score / EMA and AdamW moments appear exactly."""
    from onestep.stepbench import CIFAR_UNET

    import diffusers

    with torch.device("meta"):
        n = sum(p.numel() for p in diffusers.UNet2DModel(**CIFAR_UNET).parameters())
    gib = 2**30
    on = simulate_memory("cifar", "bf16", batch_size=2, ema=True)
    off = simulate_memory("cifar", "bf16", batch_size=2, ema="offload")
    none = simulate_memory("cifar", "bf16", batch_size=2, ema=False)
    assert on["device"] == "simulated" and on["sync"] == "device"  # as `auto` decides on a GPU with fused AdamW
    assert on["optimizer_state_gib"] == pytest.approx(2 * 2 * 4 * n / gib, rel=1e-3)  # two moments, two nets
    for phase in _phases(on):  # the EMA: 4 bytes per generator weight on the device, none when offloaded
        assert _phases(on)[phase] - _phases(off)[phase] == pytest.approx(4 * n / gib, rel=1e-3)
        plain = phase.replace(" + EMA", "")  # without an EMA the phase has no EMA update
        assert _phases(off)[phase] == pytest.approx(_phases(none)[plain], abs=1e-3)
    # the fake-score turn's optimizer phase holds what every step keeps: weights (teacher bf16, generator and fake
    # score float32), EMA, both nets' moments, the small batch; and the fake score's gradients until its step is done
    fixed = (2 + 4 + 4 + 4 + 16 + 4) * n / gib
    assert _phases(on)["fake score optimizer"] == pytest.approx(fixed, rel=0.01)


def test_simulated_lora_generator_keeps_no_float32_copy_of_the_generator():
    """A LoRA generator on the teacher's shared weights: the generator's float32 weights, EMA and AdamW moments (16
    bytes per weight) leave every step's fixed state; its adapters' state (and their 4-byte copy) is what comes in."""
    from onestep.stepbench import CIFAR_UNET

    import diffusers

    with torch.device("meta"):
        unet = diffusers.UNet2DModel(**CIFAR_UNET)
    n = sum(p.numel() for p in unet.parameters())
    full = simulate_memory("cifar", "bf16", batch_size=2)
    lora = simulate_memory("cifar", "bf16", batch_size=2, generator_lora=8)
    assert lora["generator_lora"] == 8 and full["generator_lora"] == 0
    from onestep.triad import DEFAULT_LORA_TARGETS, add_lora

    with torch.device("meta"):
        add_lora(unet, DEFAULT_LORA_TARGETS, 8, "generator")
    m = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    assert 0 < m < n / 5
    drop = full["phase_peak_gib"]["fake score optimizer"] - lora["phase_peak_gib"]["fake score optimizer"]
    assert drop * 2**30 == pytest.approx(16 * n - 16 * m, rel=0.01)


def test_simulated_gradient_checkpointing_and_8bit_lower_the_peak():
    base = simulate_memory("cifar", "bf16", batch_size=64)
    ckpt = simulate_memory("cifar", "bf16", batch_size=64, gradient_checkpointing=True)
    assert _phases(ckpt)["generator forward"] < _phases(base)["generator forward"] - 0.1
    pytest.importorskip("bitsandbytes")
    small = simulate_memory("cifar", "bf16", batch_size=64, optimizer="adamw8bit")
    assert small["optimizer_state_gib"] < base["optimizer_state_gib"] / 3
    assert small["peak_mem_gib"] < base["peak_mem_gib"]


def test_simulate_memory_refusals():
    with pytest.raises(StepBenchError, match="cannot be simulated"):
        simulate_memory("cifar", "bf16-compile", batch_size=2)
    with pytest.raises(StepBenchError, match="at least 2"):
        simulate_memory("cifar", "bf16", batch_size=2, steps=1)


def test_step_benchmark_cli_simulates_memory(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "eval/step_benchmark.py", "--simulate-memory", "--preset", "digits",
                        "--batch-size", "8", "--ema", "on,offload", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| digits | DMD | bf16 | copy fake score, EMA in CPU memory, AdamW | 8 | simulated |" in r.stdout
    import json

    rows = json.loads(out.read_text())
    assert [row["ema"] for row in rows] == [True, "offload"] and rows[1]["peak_mem_gib"] < rows[0]["peak_mem_gib"]
    for bad, msg in ((["--variants", "bf16-compile"], "cannot be simulated"), (["--cudnn-benchmark", "on"], "do not apply"),
                     (["--steps", "1"], "--steps must be"), (["--generator-lora", "4,x"], "expected LoRA ranks")):
        r = subprocess.run([sys.executable, "eval/step_benchmark.py", "--simulate-memory", "--preset", "digits", *bad],
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_sdxl_preset_conditions_reach_its_unet():
    """The sdxl step-benchmark preset (2.6B parameters: fake tensors only here): its packed prompt / pooled / size-id
    condition unpacks into the UNet's added conditioning, and the teacher's x0 has the latent shape."""
    from onestep.stepbench import build_workload

    with simulated_accelerator() as mem:
        with mem.host_allocations():
            work = build_workload("sdxl", torch.device("cuda"))
            assert work.batch_size == 4 and work.shape == (4, 128, 128)
            n = sum(p.numel() for p in work.teacher.parameters())
            assert 2.5e9 < n < 2.7e9
            cond = work.cond(2, torch.device("cpu"))
            with torch.no_grad():
                x0 = work.teacher(torch.randn(2, *work.shape), torch.tensor([500, 900]), cond)
            assert x0.shape == (2, *work.shape) and x0.dtype == torch.float32
        assert mem.peak == 0  # everything above was declared host memory

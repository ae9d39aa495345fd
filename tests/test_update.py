"""The update rule after each backward (onestep.update): a non-finite update is skipped, decided on the host (one
read per update) or on the device (fused AdamW's found_inf, the EMA blended with weight 0; nothing read)."""
import os

import pytest
import torch

from onestep.errors import NonFiniteError, OnestepError
from onestep.triad import in_place_ema
from onestep.update import Updates, accumulated, device_skip_blocker, floats, mean_logs

CPU = torch.device("cpu")


def build():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    return net, opt, in_place_ema(net.parameters(), 0.9), torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def state(net, opt, ema) -> list[torch.Tensor]:
    """Everything an update writes: weights, AdamW's moments and step counts, the EMA's shadow weights."""
    out = [p.detach().clone() for p in net.parameters()]
    out += [v.detach().clone() for p in net.parameters() for v in opt.state[p].values()]
    return out + [s.detach().clone() for s in ema.shadow_params]


def run(mode: str, poison=(), steps: int = 6, max_streak: int = 3):
    """`steps` updates of a small net; the losses at the indices in `poison` are NaN. The state after each update."""
    net, opt, ema, sched = build()
    updates = Updates(mode, CPU, [opt], max_streak=max_streak)
    g = torch.Generator().manual_seed(1)
    states = []
    for i in range(steps):
        loss = net(torch.randn(16, 4, generator=g)).square().mean()
        if i in poison:
            loss = loss * float("nan")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        updates(i, "generator", loss, norm, [opt], [sched], {"loss_x": loss.detach(), "lr": sched.get_last_lr()[0]},
                lambda keep: ema.step(net.parameters(), keep))
        assert all(p.grad is None for p in net.parameters())  # gradients never outlive their update
        states.append(state(net, opt, ema))
    return states, updates


def test_host_and_device_give_the_same_trajectory():
    host, _ = run("host")
    device, updates = run("device")
    assert updates.on_device and updates.skipped_count() == 0
    for a, b in zip(host, device):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(host[0], host[-1]))  # it trained


@pytest.mark.parametrize("mode", ["host", "device"])
def test_a_skipped_update_changes_nothing(mode):
    states, updates = run(mode, poison=(2,))
    before, after = states[1], states[2]
    assert all(torch.equal(x, y) for x, y in zip(before, after))  # weights, moments, step counts, EMA
    assert not all(torch.equal(x, y) for x, y in zip(states[2], states[3]))  # and the next update applies
    assert updates.skipped_count() == 1 and int(updates.streak) == 0
    updates.check()  # one skip, then a good update: no stop


def test_host_stops_at_the_limit_with_one_line(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteError) as e:
        run("host", poison=(1, 2, 3))
    msg = str(e.value)
    assert msg.startswith("step 4: the generator loss (loss_x) was not finite; 3 updates in a row were skipped")
    assert "\n" not in msg and "No checkpoint was written" in msg  # (no run folder here)
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)  # a run folder with a checkpoint: resume it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NonFiniteError, match="is the last good state: .* then --resume latest$"):
        run("host", poison=(1, 2, 3))


def test_device_counts_without_reading_and_stops_at_the_next_check():
    states, updates = run("device", poison=(1, 2, 3, 4), steps=5)  # no read inside the updates: no stop yet
    assert torch.is_tensor(updates.streak) and int(updates.streak) == 4 and updates.skipped_count() == 4
    assert all(torch.equal(x, y) for x, y in zip(states[0], states[4]))
    with pytest.raises(NonFiniteError, match=r"^step 5: the generator loss \(loss_x\) was not finite; 4 updates"):
        updates.check()


def test_auto_reads_on_the_host_on_a_cpu_and_refuses_what_cannot_skip_on_the_device():
    net = torch.nn.Linear(2, 2)
    fused = torch.optim.AdamW(net.parameters(), fused=True)
    plain = torch.optim.AdamW(net.parameters(), foreach=False)
    assert not Updates("auto", CPU, [fused], 3).on_device and Updates("device", CPU, [fused], 3).on_device
    assert device_skip_blocker([fused]) is None and "fused" in device_skip_blocker([plain])
    assert not Updates("auto", torch.device("meta"), [plain], 3).on_device  # no fused kernel: host reads
    with pytest.raises(OnestepError, match="nonfinite_check: 'device' needs torch's fused AdamW"):
        Updates("device", CPU, [plain], 3)
    with pytest.raises(OnestepError, match="unknown value 'gpu'"):
        Updates("gpu", CPU, [fused], 3)


def test_floats_reads_tensors_and_keeps_numbers():
    logs = {"a": torch.tensor(1.5), "b": torch.tensor([2.0]), "c": 3, "d": torch.tensor(float("nan"))}
    out = floats(logs)
    assert out["a"] == 1.5 and out["b"] == 2.0 and out["c"] == 3 and out["d"] != out["d"]
    assert all(isinstance(v, (int, float)) for v in out.values())


def test_config_refuses_device_checks_it_cannot_do(tmp_path):
    from onestep.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="nonfinite_check: 'device' needs torch's fused AdamW without a gradient scaler"):
        load_config(["--nonfinite_check", "device", "--mixed_precision", "fp16"])
    with pytest.raises(ConfigError, match="nonfinite_check"):
        load_config(["--nonfinite_check", "sometimes"])


@pytest.mark.parametrize("method", ["dmd", "dmd2"])
def test_a_step_with_the_device_rule_reads_no_tensor_on_the_host(method, monkeypatch):
    """One DMD / DMD2 iteration (the step benchmark's: the trainer's method code and update rule) reads no tensor
    value on the host (.item(), bool(), float(), .tolist(), .numpy(), .cpu(): each a wait for a GPU) with the device
    rule; the host rule reads the finiteness once per update, the old rule also each turn's loss terms."""
    from onestep.stepbench import StepRunner, build_workload

    work = build_workload("digits", CPU, 4)
    reads = {}
    for sync in ("device", "host", "logs"):
        runner = StepRunner(work, "fp32", CPU, sync=sync, method=method)
        runner.step()
        count = []
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"):
                original = getattr(torch.Tensor, name)
                m.setattr(torch.Tensor, name, lambda self, *a, _f=original, **k: count.append(1) or _f(self, *a, **k))
            runner.step()
        reads[sync] = len(count)
    assert reads == {"device": 0, "host": 2, "logs": 4}


@pytest.mark.slow
def test_the_training_loop_reads_nothing_each_iteration_with_the_device_rule(tmp_path):
    """The trainer end to end (DMD2 with its GAN on real digits, EMA; CPU): with the device rule no call site reads a
    tensor value on the host once per iteration (what remains, e.g. the final evaluation's per-sample seeds, is not in
    the loop); with the host rule the finiteness check reads once per update. update_ratio 1: every iteration has
both turns, so a read in either is counted at least once per iteration."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    steps = 12
    sites = {}
    for check in ("device", "host"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "count_host_reads.py"), "--preset", "smoke",
                            "--steps", str(steps), "--log_every", "1000", "--checkpoint_every", "0", "--sample_every", "0",
                            "--ema_decay", "0.9", "--update_ratio", "1", "--export", "false", "--output_dir", str(tmp_path),
                            "--name", check,
                            "--nonfinite_check", check], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        sites[check] = {row["site"]: row["count"] for row in rows if row["count"] >= steps}
    assert all(site.startswith("onestep/streaming.py") for site in sites["device"]), sites["device"]
    assert any(site.startswith("onestep/update.py") and n == 2 * steps for site, n in sites["host"].items()), sites["host"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_dmd_step_on_a_gpu_makes_the_host_wait_only_where_asked():
    """On a GPU, a DMD iteration with the skip decided on the device makes the host wait for the device nowhere
    (no .item(), no copy from pageable host memory); the host rule reads once per update, the old rule also each
    turn's loss terms."""
    from onestep.stepbench import StepRunner, build_workload, count_host_syncs

    cuda = torch.device("cuda")
    work = build_workload("digits", cuda, 8)
    syncs = {}
    for sync in ("logs", "host", "device"):
        runner = StepRunner(work, "bf16", cuda, sync=sync)
        runner.step()
        runner.step()  # optimiser states and the schedule's table exist from here
        torch.cuda.synchronize()
        syncs[sync] = count_host_syncs(runner.step, cuda)
    assert syncs["device"] == 0 and syncs["host"] >= 2 and syncs["logs"] > syncs["host"], syncs


def test_a_skipped_fp16_update_ends_the_scalers_turn_and_lowers_its_scale():
    """mixed_precision fp16 (host rule): an overflow's skipped update still closes the gradient scaler's turn, as a
    skipped optimizer step would (the next turn's unscale once raised 'unscale_() has already been called'), and
    halves the scale; the next finite turn updates the weights."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # accelerate's state, which its optimizer wrapper reads
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = AcceleratedOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2), scaler=scaler)
    updates = Updates("host", CPU, [opt], max_streak=3)
    before = [p.detach().clone() for p in net.parameters()]
    for i, big in enumerate((1e35, 1.0)):  # the first turn's scaled gradient overflows float32
        loss = net(torch.full((2, 4), big)).square().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt.optimizer)  # as accelerate's clip_grad_norm_ does
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        applied = updates(i, "generator", loss, norm, [opt], [], {})
        assert applied == (i == 1)
        if i == 0:
            assert scaler.get_scale() == 2.0**15 and all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_accumulated_micro_batches_give_the_whole_batch_gradient():
    """Two micro-batches (each backward of loss / 2) leave the gradient of the mean over both, and the mean of
    their logs; one micro-batch is the plain turn (its own loss tensor, no scaling)."""
    from accelerate import Accelerator

    acc, net = Accelerator(cpu=True), build()[0]

    def loss_fn(model, batch):
        per = model(batch["z"]).square().flatten()
        return per.mean(), {"loss_x": per.mean().detach(), "n": len(per), "tag": "last"}

    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    whole, logs1 = accumulated(acc, loss_fn, net, [{"z": z}])
    assert whole.requires_grad and logs1["n"] == 8  # one micro-batch: returned as loss_fn gave it
    grad = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    loss, logs = accumulated(acc, loss_fn, net, [{"z": z[:3]}, {"z": z[3:]}])  # unequal halves: mean of the means
    parts = [net(z[:3]).square().mean(), net(z[3:]).square().mean()]
    assert torch.allclose(loss, (parts[0] + parts[1]) / 2) and not loss.requires_grad
    net.zero_grad(set_to_none=True)
    accumulated(acc, loss_fn, net, [{"z": z[:4]}, {"z": z[4:]}])
    assert all(torch.allclose(p.grad, g, atol=1e-7) for p, g in zip(net.parameters(), grad))
    assert logs["n"] == 4.0 and logs["tag"] == "last" and torch.allclose(logs["loss_x"], loss)
    assert mean_logs([{"a": 1}, {"b": torch.tensor(2.0)}, {"a": 3}]) == {"a": 2.0, "b": torch.tensor(2.0)}

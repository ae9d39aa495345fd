"""Memory options of the trained networks: bitsandbytes' 8-bit AdamW and the generator EMA kept in CPU memory."""
import copy
import os
import sys

import pytest
import torch
from test_reliability import EXACT, final_state, straight_and_resumed

from onestep import optim
from onestep.config import ConfigError, load_config
from onestep.optim import OptimizerError, make_optimizer, state_bytes
from onestep.triad import in_place_ema

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def fit(net, kind, steps=100):
    """Fit a fixed regression with one optimiser kind: the trained copy, the losses, the optimiser."""
    torch.manual_seed(1)
    x = torch.randn(512, 64)
    y = torch.sin(x @ torch.randn(64, 64) / 8)
    net = copy.deepcopy(net)
    opt = make_optimizer(net.parameters(), kind, lr=3e-3, device=CPU, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        loss = (net(x) - y).square().mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, losses, opt


def test_adamw8bit_follows_adamw_with_a_quarter_of_the_state():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 64))
    ref, ref_losses, ref_opt = fit(net, "adamw")
    q, q_losses, q_opt = fit(net, "adamw8bit")
    assert all(s["state1"].dtype == torch.uint8 for p, s in q_opt.state.items() if p.numel() >= optim.MIN_8BIT_SIZE)
    assert state_bytes(q_opt) < 0.3 * state_bytes(ref_opt)  # 2 bytes of moments per weight instead of 8
    move = [torch.cat([(a - b).flatten() for a, b in zip(m.parameters(), net.parameters())]) for m in (ref, q)]
    assert torch.nn.functional.cosine_similarity(*move, dim=0) > 0.99  # the same updates, up to quantisation
    assert q_losses[-1] < 0.2 * q_losses[0] and q_losses[-1] == pytest.approx(ref_losses[-1], rel=0.05)


def test_optimizer_bad_name_or_missing_bitsandbytes_is_one_clear_error(monkeypatch):
    with pytest.raises(OptimizerError, match="unknown optimizer 'sgd'"):
        make_optimizer([torch.nn.Parameter(torch.zeros(3))], "sgd", lr=1e-3, device=CPU)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    with pytest.raises(OptimizerError, match="pip install bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(3))], "adamw8bit", lr=1e-3, device=CPU)
    with pytest.raises(ConfigError, match="optimizer: 'adamw8bit' needs bitsandbytes"):
        load_config(["--optimizer", "adamw8bit"])


def test_offloaded_ema_equals_the_ema_on_the_device_and_round_trips():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    net[1].bias.requires_grad_(False)  # frozen tensors are copied
    on_device, offloaded = in_place_ema(net.parameters(), 0.9), in_place_ema(net.parameters(), 0.9, offload=True)
    for i in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        for e in (on_device, offloaded):
            e.step(net.parameters())
        if i == 0:
            staging = [id(b) for b in offloaded._staging]
    assert [id(b) for b in offloaded._staging] == staging  # the host buffers are reused, not re-made each step
    assert all(s.device.type == "cpu" for s in offloaded.shadow_params)
    assert all(torch.equal(a, b) for a, b in zip(on_device.shadow_params, offloaded.shadow_params))
    assert torch.equal(offloaded.shadow_params[3], net[1].bias)
    fresh = in_place_ema(net.parameters(), 0.5, offload=True)
    fresh.load_state_dict(offloaded.state_dict())
    assert fresh.optimization_step == 4 and all(torch.equal(a, b) for a, b in zip(fresh.shadow_params, offloaded.shadow_params))


def test_adamw8bit_and_offloaded_ema_resume_exactly(cond_teacher, tmp_path, monkeypatch):
    """8 steps straight == 3 steps, a crash after the checkpoint, --resume latest: identical tensors, with 8-bit
    moments (the tiny teacher's tensors are small: the 8-bit threshold is lowered so most of them are quantised)."""
    monkeypatch.setattr(optim, "MIN_8BIT_SIZE", 256)
    args = [*EXACT, "--teacher", cond_teacher, "--output_dir", str(tmp_path), "--steps", "8", "--checkpoint_every", "3",
            "--checkpoints_total_limit", "0", "--optimizer", "adamw8bit", "--offload_ema", "true"]
    straight_and_resumed(monkeypatch, args)
    a, b = final_state(str(tmp_path / "straight"), 8), final_state(str(tmp_path / "resumed"), 8)
    same = lambda x, y: torch.equal(x, y) if torch.is_tensor(x) else x == y  # noqa: E731 (bitsandbytes: int steps)
    assert a.keys() == b.keys() and [k for k in a if not same(a[k], b[k])] == []
    assert any(k.startswith("optimizer") and torch.is_tensor(v) and v.dtype == torch.uint8 for k, v in a.items())
    assert os.path.exists(tmp_path / "straight" / "checkpoints" / "step_0000008")

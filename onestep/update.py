"""A turn's update after its backward: skip it when the loss or the gradient norm is not finite, else step the
optimisers, their LR schedules and (generator turns) the EMA; count the skipped updates and stop a run of them.

Where the skip is decided (`nonfinite_check`):
  host    the finiteness is read on the host before each update: one device-to-host sync per update. A skipped
          update leaves everything as it was (weights, optimiser state, LR schedule, EMA).
  device  nothing is read: torch's fused Adam/AdamW skip their own kernel when handed a `found_inf` flag (the
          protocol torch's GradScaler uses; the optimiser's step count is kept too), and the EMA blends with weight
          0. The LR schedules and the EMA's decay ramp still count the skipped update. The counts stay on the device
          and are read by `check()`, which the trainer calls where it reads anyway (logging, checkpoints,
          evaluation), so a run of non-finite updates stops at the first check past the limit.
  auto    device on an accelerator when every optimiser is torch's fused Adam/AdamW and no fp16 gradient scaler
          runs; host otherwise (on a CPU a read costs nothing).
Without skips both give the same weights, optimiser states and EMA (tested).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Sequence

import torch

from .errors import NonFiniteError, OnestepError

NONFINITE_CHECKS = ("auto", "host", "device")


def _inner(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps torch's


def device_skip_blocker(opts) -> str | None:
    """Why these optimisers cannot skip an update on the device (None: they can)."""
    for opt in opts:
        inner = _inner(opt)
        if getattr(opt, "scaler", None) is not None:
            return "an fp16 gradient scaler runs (mixed_precision fp16)"
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or not inner.defaults.get("fused"):
            return f"{type(inner).__module__}.{type(inner).__name__} is not torch's fused Adam/AdamW"
    return None


def floats(logs: dict) -> dict:
    """The logs as Python numbers: tensors read with one device-to-host copy per device."""
    out, by_device = dict(logs), {}
    for k, v in logs.items():
        if torch.is_tensor(v):
            by_device.setdefault(v.device, []).append(k)
    for keys in by_device.values():
        values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values))
    return out


def accumulated(accelerator, loss_fn: Callable, triad, batches: Sequence[dict], modules=()) -> tuple[torch.Tensor, dict]:
    """One turn's loss and backward over its micro-batches (--gradient_accumulation_steps): each backward takes
    loss_i / n, so the gradients add up to those of the mean over all of them. The gradients of those `modules` that
    DDP or FSDP2 wrapped are synchronised once, at the last backward (accelerate's no_sync before it; other modules
    are passed over). Returns the mean loss (detached when n > 1) and each log's mean over the micro-batches; one
    micro-batch is exactly the plain turn."""
    n, total, parts = len(batches), 0.0, []
    wrapped = [m for m in modules if m is not None and (hasattr(m, "no_sync") or hasattr(m, "set_requires_gradient_sync"))]
    for i, batch in enumerate(batches):
        with contextlib.ExitStack() as hold:
            for m in wrapped if i < n - 1 else ():
                hold.enter_context(accelerator.no_sync(m))
            with accelerator.autocast():
                loss, logs = loss_fn(triad, batch)
            accelerator.backward(loss if n == 1 else loss / n)
        if n == 1:
            return loss, logs
        total, parts = total + loss.detach().float() / n, parts + [logs]
    return total, mean_logs(parts)


def mean_logs(parts: Sequence[dict]) -> dict:
    """Each key's mean over the micro-batches' logs that hold it (tensors and numbers; other values: the last)."""
    out = {}
    for k in {k: None for logs in parts for k in logs}:
        vals = [logs[k] for logs in parts if k in logs]
        if all(torch.is_tensor(v) and v.numel() == 1 for v in vals):
            out[k] = torch.stack([v.detach().float().reshape(()) for v in vals]).mean()
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = sum(vals) / len(vals)
        else:
            out[k] = vals[-1]
    return out


class Updates:
    """The trainer's (and the step benchmark's) update rule after each turn's backward and clipping."""

    def __init__(self, mode: str, device: torch.device, opts: list, max_streak: int,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None, where: str = ""):
        if mode not in NONFINITE_CHECKS:
            raise OnestepError(f"nonfinite_check: unknown value {mode!r}; choose from {', '.join(NONFINITE_CHECKS)}")
        blocker = device_skip_blocker([o for o in opts if o is not None])
        if mode == "device" and blocker:
            raise OnestepError(f"nonfinite_check: 'device' needs torch's fused AdamW, but {blocker}; "
                               "use --nonfinite_check auto or host")
        self.on_device = mode == "device" or (mode == "auto" and blocker is None and device.type != "cpu")
        self.device, self.max_streak, self.gather, self.where = device, max_streak, gather, where
        zero = torch.zeros((), dtype=torch.long, device=device)
        self.skipped, self.streak = (zero, zero.clone()) if self.on_device else (0, 0)
        self._last: tuple | None = None  # (step, turn, logs) of the newest update, for the stop message

    def __call__(self, step: int, turn: str, loss: torch.Tensor, norm, opts: list, scheds: list, logs: dict,
                 ema_step: Callable | None = None) -> bool:
        """Apply or skip this turn's update; False when it was skipped on the host (its logs are then not kept)."""
        finite = torch.isfinite(loss.detach().float()) & torch.isfinite(torch.as_tensor(norm, device=loss.device))
        if self.gather is not None:  # every process skips together
            finite = self.gather(finite.float()[None]).min() > 0
        self._last = (step, turn, logs)
        if self.on_device:
            skip = ~finite
            self.skipped = self.skipped + skip
            self.streak = torch.where(finite, 0, self.streak + 1)
            for opt in opts:
                inner = _inner(opt)
                inner.found_inf = skip.float()
                try:
                    opt.step()
                finally:
                    del inner.found_inf
            self._after(opts, scheds, ema_step, finite)
            return True
        if not bool(finite):  # skip: nothing updated
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            for scaler in {id(s): s for s in (getattr(o, "scaler", None) for o in opts) if s is not None}.values():
                scaler.update()  # fp16: the turn's unscale ends here, and an overflow lowers the scale, as a step would
            self.skipped, self.streak = self.skipped + 1, self.streak + 1
            self.check()
            return False
        self.streak = 0
        for opt in opts:
            opt.step()
        self._after(opts, scheds, ema_step, None)
        return True

    @staticmethod
    def _after(opts, scheds, ema_step, keep) -> None:
        for opt in opts:
            opt.zero_grad(set_to_none=True)  # memory: gradients live from this backward to this step only
        for sched in scheds:
            sched.step()
        if ema_step is not None:
            ema_step(keep)

    def skipped_count(self) -> int:
        return int(self.skipped)

    def check(self) -> None:
        """Stop the run (NonFiniteError, one line) once max_streak updates in a row were skipped."""
        streak = int(self.streak)
        if streak < self.max_streak or self._last is None:
            return
        step, turn, logs = self._last
        terms = [k for k, v in floats(logs).items() if isinstance(v, float) and not math.isfinite(v)] or ["its gradient"]
        folder = os.path.join(self.where, "checkpoints")
        saved = os.path.isdir(folder) and any(d.startswith("step_") and not d.endswith(".tmp") for d in os.listdir(folder))
        then = (f"The newest checkpoint in {folder} is the last good state: lower the learning rates or check the "
                "teacher, then --resume latest") if saved else ("No checkpoint was written (--checkpoint_every): lower "
                                                                "the learning rates or check the teacher and start again")
        raise NonFiniteError(f"step {step + 1}: the {turn} loss ({', '.join(terms)}) was not finite; {streak} updates "
                             f"in a row were skipped, so the run stopped. {then}")

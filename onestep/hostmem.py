"""Host memory of CPU runs: keep freed memory in the process, so each step's tensors reuse warm pages.

glibc serves a large allocation (from 128 KiB, a threshold that grows with what was freed) with its own mmap and
gives it back to the OS on free; a heap top above the trim threshold is returned too. A CPU training step allocates
and frees the same activation and gradient sizes every iteration, so by default it faults in fresh zeroed pages each
time: on the digits preset's DMD step ~7 200 minor page faults per step (28 MiB), and 0 for its passes repeated
alone. `reuse_freed_memory` raises the mmap threshold to glibc's maximum (32 MiB on 64-bit) and the trim threshold
to 1 GiB: the faults fall to ~70 per step and the step to passes ratio from 1.12-1.15x to 1.08-1.10x (2 cores; the
README's step benchmark). The cost: memory freed below the process's high-water mark stays with the process.

The same effect as starting Python with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set, applied from inside the
run (mallopt), so `accelerate launch` needs no environment; nothing is changed off glibc (macOS, musl).
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's HEAP_MAX / 2 on 64-bit, the largest it accepts
TRIM_THRESHOLD = 1 << 30
CPU_MALLOC = ("reuse", "system")


def reuse_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process; True when both were accepted.

    Both or neither: a fixed trim threshold alone also fixes the mmap threshold at its 128 KiB start (glibc stops
    adapting it), which makes every activation an mmap: on the digits step that doubled the step time."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return False
    return mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1


def apply(cpu_malloc: str, device_type: str) -> bool:
    """The run's `cpu_malloc` choice for a process on `device_type`: "reuse" on a CPU device keeps freed memory."""
    return cpu_malloc == "reuse" and device_type == "cpu" and reuse_freed_memory()


def configure_cpu(cfg, device_type: str, num_processes: int) -> None:
    """A training process on a CPU device: torch's threads (`cpu_threads`, else this machine's cores shared among the
    processes; accelerate launch alone would pin 1) and the allocator (`cpu_malloc`). Nothing on other devices."""
    if device_type != "cpu":
        return
    import torch

    torch.set_num_threads(cfg.cpu_threads or max(1, len(os.sched_getaffinity(0)) // num_processes))
    apply(cfg.cpu_malloc, device_type)

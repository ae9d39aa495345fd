"""onestep.hostmem: a CPU run keeps freed memory, so repeated same-size tensors stop faulting in fresh pages."""
import platform
import subprocess
import sys

import pytest

from onestep import hostmem

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="mallopt tuning is glibc's")

# 16 step-like rounds: 24 activations of 4 MiB written, then freed together (96 MiB). Whether glibc's defaults
# fault them in afresh each round depends on what the process freed before (its thresholds adapt): measured here,
# from 25 to 393 thousand faults over the 16 rounds, and 0 or 95 MiB handed back to the OS per round.
CHURN = """
import os, resource, sys, torch
from onestep import hostmem
applied = hostmem.apply(sys.argv[1], "cpu")
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
def churn():
    xs = [torch.empty(1 << 20).fill_(1.0) for _ in range(24)]
    held = rss()
    del xs
    return held - rss()
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
released = max(churn() for _ in range(16))
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, released, 16 * 24 * (4 << 20) // page)
"""


@glibc
def test_reuse_keeps_freed_memory_and_stops_page_faults():
    out = subprocess.run([sys.executable, "-c", CHURN, "reuse"], capture_output=True, text=True, check=True)
    applied, faults, released, pages = out.stdout.split()
    assert applied == "True"
    assert int(released) < 8 << 20  # the 96 MiB freed each round stay with the process
    assert int(faults) < int(pages) // 20  # measured: 1-5 thousand of the 393 thousand pages the rounds write


def test_only_cpu_runs_with_reuse_are_tuned():
    assert not hostmem.apply("system", "cpu")
    assert not hostmem.apply("reuse", "cuda")

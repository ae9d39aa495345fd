"""onestep.hostmem: a CPU run keeps freed memory, so repeated same-size tensors stop faulting in fresh pages."""
import platform
import subprocess
import sys

import pytest

from onestep import hostmem

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="mallopt tuning is glibc's")

# 16 step-like rounds: 24 activations of 4 MiB written, then freed together (96 MiB: above the largest trim
# threshold glibc's own adaptation reaches, 64 MiB, so its defaults hand the pages back every round)
CHURN = """
import resource, sys, torch
from onestep import hostmem
applied = hostmem.apply(sys.argv[1], "cpu")
def churn():
    xs = [torch.empty(1 << 20).fill_(1.0) for _ in range(24)]
    return sum(float(x[-1]) for x in xs)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(16):
    churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def churn_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@glibc
def test_reuse_stops_page_faults_of_repeated_allocations():
    applied, reuse = churn_faults("reuse")
    untouched, system = churn_faults("system")
    assert (applied, untouched) == ("True", "False")
    assert reuse * 20 < system  # measured: 1-5 thousand faults against 393 thousand (every page of every round)


def test_only_cpu_runs_with_reuse_are_tuned():
    assert not hostmem.apply("system", "cpu")
    assert not hostmem.apply("reuse", "cuda")

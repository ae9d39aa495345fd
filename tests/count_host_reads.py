"""Run train/distill.py in this process with torch.Tensor's host reads (.item(), bool(), float(), int(), .tolist(),
.numpy(), .cpu()) counted per call site; print the counts as JSON lines {"site": "file:line method", "count": n}.

    python tests/count_host_reads.py [distill.py options]
"""
import collections
import json
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
counts: collections.Counter = collections.Counter()


def counted(name: str):
    original = getattr(torch.Tensor, name)

    def read(self, *args, **kwargs):
        caller = sys._getframe(1)
        counts[f"{os.path.relpath(caller.f_code.co_filename, ROOT)}:{caller.f_lineno} {name}"] += 1
        return original(self, *args, **kwargs)

    return read


for method in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"):
    setattr(torch.Tensor, method, counted(method))
sys.argv = [os.path.join(ROOT, "train", "distill.py"), *sys.argv[1:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
for site, n in counts.most_common():
    print(json.dumps({"site": site, "count": n}))

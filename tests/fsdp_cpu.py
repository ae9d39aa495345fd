"""Run a script under accelerate's FSDP2 path on CPU processes (gloo): the test stand-in for a GPU FSDP launch.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file train/accelerate/fsdp.yaml --num_processes 2 \\
        tests/fsdp_cpu.py train/distill.py ARGS...

accelerate runs an FSDP config on CPUs as plain multi-process data parallelism (MULTI_CPU). This wrapper builds the
FSDP plugin from the launcher's FSDP_* environment (the config file's settings, as accelerate does on GPUs) and puts
the accelerator state on the FSDP path after it is created; torch's fully_shard then shards over gloo.
"""
import runpy
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def _fsdp_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = FullyShardedDataParallelPlugin()  # FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ... from the environment
    if self.mixed_precision != "no":
        plugin.set_mixed_precision(self.mixed_precision)
    self.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    self.state.fsdp_plugin = plugin


accelerate.Accelerator.__init__ = _fsdp_init
if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")

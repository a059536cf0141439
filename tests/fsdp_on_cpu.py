"""Test-only launcher: a training stage under Accelerate's FSDP2 on CPU processes (gloo), started
by torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_on_cpu.py stages.train_full ARGS...

Accelerate switches to FSDP only from the multi-GPU types (accelerate/state.py), so on CPU it would
run DDP, and the stage refuses that when FSDP was asked for (ftstudy.train.launching). This script changes
one thing: once Accelerate's state is initialised with an FSDP plugin (ACCELERATE_USE_FSDP=true,
FSDP_VERSION=2), its distributed type becomes FSDP, as it would on GPUs. Everything after that is
Accelerate's and PyTorch's own FSDP2 path (fully_shard, get_state_dict, clip_grad_norm_), and the
stage's own code. Nothing outside the tests imports this.
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_as_on_gpus(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_as_on_gpus

if __name__ == "__main__":
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)

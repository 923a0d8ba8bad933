"""Run tools/train.py under FSDP2 on CPU processes over gloo (a torchrun worker for tests/test_fsdp.py).

accelerate 1.15 turns FSDP on only for accelerator devices: `AcceleratorState` keeps its FSDP plugin for
MULTI_GPU / MULTI_XPU / ... and drops it for MULTI_CPU (accelerate/state.py), so `accelerate launch --cpu` with an
FSDP config trains under plain DDP. torch itself runs FSDP2 (`fully_shard`, DTensor, reduce-scatter) on gloo, so
this worker keeps the plugin that accelerate built from the launch environment (ACCELERATE_USE_FSDP, FSDP_*, from
configs/accelerate/fsdp2.yaml) and sets the distributed type to FSDP. Everything after that is accelerate's own FSDP2
code: `fsdp2_prepare_model`, sharded `save_state` / `load_state`, `clip_grad_norm_`, `no_sync`.

    torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py --config ... (with the FSDP environment of the config)
"""
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
_init = AcceleratorState.__init__


def _keep_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what later AcceleratorState()s copy
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)


if __name__ == "__main__":
    AcceleratorState.__init__ = _keep_fsdp_on_cpu
    sys.path.insert(0, str(ROOT / "tools"))
    import train

    sys.exit(train.main(sys.argv[1:]))

"""The compiled training step: the denoising network under torch.compile (inductor), forward and backward."""
from __future__ import annotations

from torch import nn


def compile_for_training(network: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile `network` in place for training (static shapes; a new batch shape compiles once more)."""
    network.compile(dynamic=False, backend=backend)
    return network

"""The fast generation path: fused q|k|v, NHWC (channels_last) and the networks compiled, with CUDA graphs on GPUs.

`compile_pipeline(pipe)` (`ldm-txt2img --compile`, `Pipeline.compile()`) turns it on for every stage of a pipeline
or cascade, in place: state_dict keys are unchanged (`ldm.models.fused`, `nn.Module.compile`). The sampling loop
keeps its sigmas as Python floats (`ldm.diffusion.samplers`), so no step waits on the GPU; with static shapes
(one batch and size per call) inductor's "reduce-overhead" mode replays each network call as one CUDA graph.
Same results: tests/test_fast_paths.py compares the fast path with the reference path on the CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.errors import LdmError
from ldm.models.fused import fuse_qkv

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_MODE = "reduce-overhead"  # CUDA graphs: measured fastest for the SD-1.5 step (docs/benchmarks/README.md)


def fast_network(network: nn.Module, *, mode: str | None = DEFAULT_MODE, backend: str = "inductor",
                 fuse: bool = True, channels_last: bool = True) -> nn.Module:
    """Make one network fast in place: fuse its q|k|v, store it NHWC, compile it (`mode=None`: no compile)."""
    if mode is not None and mode not in COMPILE_MODES:
        raise LdmError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if fuse:
        fuse_qkv(network)
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if mode is not None:
        options = {} if backend != "inductor" else {"mode": mode}
        network.compile(backend=backend, dynamic=False, **options)
    return network


def compile_pipeline(pipe, *, mode: str | None = DEFAULT_MODE, backend: str = "inductor", fuse: bool = True,
                     channels_last: bool = True, decoder: bool = True):
    """Turn the fast path on for every stage of `pipe` (a Pipeline or Cascade): U-Net, and the VAE decoder too."""
    for stage in pipe.stages:
        fast_network(stage.unet, mode=mode, backend=backend, fuse=fuse, channels_last=channels_last)
        autoencoder = getattr(stage.codec, "autoencoder", None)
        if decoder and autoencoder is not None:
            fast_network(autoencoder.decoder, mode=mode, backend=backend, fuse=False, channels_last=channels_last)
    return pipe

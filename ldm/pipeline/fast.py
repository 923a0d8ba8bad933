"""The fast generation path: fused q|k|v, NHWC (channels_last) and the networks compiled, with CUDA graphs on GPUs.

`compile_pipeline(pipe)` (`ldm-txt2img --compile`, `Pipeline.compile()`) turns it on for every stage of a pipeline
or cascade, in place: state_dict keys are unchanged (`ldm.models.fused`, `nn.Module.compile`). The sampling loop
keeps its sigmas as Python floats (`ldm.diffusion.samplers`), so no step waits on the GPU; with static shapes
(one batch and size per call) inductor's "reduce-overhead" mode replays each network call as one CUDA graph.
Same results: tests/test_fast_paths.py compares the fast path with the reference path on the CPU.

`fp8=True` (opt-in) runs the transformer blocks' linear products in FP8 (`ldm.models.float8`; Ada/Hopper GPUs).
`group_norm_kernel=True` (opt-in: measured 3% slower in the compiled SD-1.5 step, run 10) runs the U-Nets' GroupNorms, with the SiLU after them, as
one Triton kernel each (`ldm.models.fused_group_norm`; CUDA, NHWC, half precision; elsewhere the reference path).
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.errors import LdmError
from ldm.models.float8 import FP8_ALIGN, check_fp8_device, to_float8, transformer_linears, uses_float8
from ldm.models.fused import fuse_qkv
from ldm.models.fused_group_norm import check_group_norm_kernel, use_fused_group_norm

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_MODE = "reduce-overhead"  # CUDA graphs: measured fastest for the SD-1.5 step (docs/benchmarks/README.md)


def fast_network(network: nn.Module, *, mode: str | None = DEFAULT_MODE, backend: str = "inductor",
                 fuse: bool = True, channels_last: bool = True, fp8: bool = False,
                 group_norm_kernel: bool = False) -> nn.Module:
    """Make one network fast in place: fuse its q|k|v, store it NHWC, optionally FP8 and the Triton GroupNorm,
    compile it (`mode=None`: no compile)."""
    if mode is not None and mode not in COMPILE_MODES:
        raise LdmError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if fp8:
        check_fp8_device(next(network.parameters()).device)
        to_float8(network)
    if group_norm_kernel:
        check_group_norm_kernel(next(network.parameters()).device)
        use_fused_group_norm(network)
    if fuse:
        fuse_qkv(network)
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if mode is not None:
        network.compile(backend=backend, dynamic=False, **({"mode": mode} if backend == "inductor" else {}))
    return network


def running_stages(pipe) -> tuple:
    """Every stage a call of `pipe` runs: a Pipeline's or Cascade's stages; a base + refiner ensemble's both."""
    return tuple(getattr(pipe, "all_stages", pipe.stages))


def compile_pipeline(pipe, *, mode: str | None = DEFAULT_MODE, backend: str = "inductor", fuse: bool = True,
                     channels_last: bool = True, decoder: bool = True, fp8: bool = False,
                     group_norm_kernel: bool = False):
    """Turn the fast path on for every stage of `pipe` (a Pipeline or Cascade): U-Net, and the VAE decoder too
    (FP8 applies to the U-Nets' transformer linears: a stage without any, e.g. a pixel upscaler without attention,
    runs as it is; a pipeline none of whose stages has any is refused; the GroupNorm kernel to the U-Nets too)."""
    stages = running_stages(pipe)
    takes_fp8 = [fp8 and (bool(transformer_linears(s.unet)) or uses_float8(s.unet)) for s in stages]
    if fp8 and not any(takes_fp8):
        raise LdmError("none of this model's networks has transformer linear layers whose widths are multiples of "
                       f"{FP8_ALIGN}: FP8 has nothing to run on; drop --fp8")
    for stage, stage_fp8 in zip(stages, takes_fp8):
        fast_network(stage.unet, mode=mode, backend=backend, fuse=fuse, channels_last=channels_last, fp8=stage_fp8,
                     group_norm_kernel=group_norm_kernel)
        autoencoder = getattr(stage.codec, "autoencoder", None)
        if decoder and autoencoder is not None:
            fast_network(autoencoder.decoder, mode=mode, backend=backend, fuse=False, channels_last=channels_last)
    return pipe

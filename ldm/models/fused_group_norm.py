"""Opt-in: the U-Net's GroupNorms (and the SiLU right after them) through one Triton kernel each, keys unchanged.

`use_fused_group_norm(network)` makes every `GroupNorm32` of `network` a `FusedGroupNorm` (same parameters, buffers
and state_dict keys, like `ldm.models.float8`'s class swap): where an `nn.SiLU` directly follows it in an
`nn.Sequential` (a ResBlock's in_layers and out_layers, the output head), the norm applies the SiLU itself and that
SiLU becomes a `SiLUInNorm` that passes its input through. A ResBlock (without scale-shift) then also hands its time
embedding to the out_layers' norm, which adds it inside the kernel (`GroupNorm(h + emb)`), instead of writing
`h + emb` out first. `use_fused_group_norm(network, False)` undoes all of it.

The kernel (`ldm.models.group_norm_kernel`, needs triton) runs only where it can: a CUDA, 4-d, channels_last,
bf16/fp16 input without autograd (inference, in training or eval mode). Anything else takes the exact reference
path (GroupNorm32, then SiLU), so turning it on is always safe; a CPU machine without triton never imports it.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import LdmError
from ldm.models.unet_blocks import GroupNorm32, ResBlock

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


_op = None


def _kernel_op():
    """`torch.ops.ldm.group_norm_nhwc`, registered by importing the Triton module (on first use only)."""
    global _op
    if _op is None:
        importlib.import_module("ldm.models.group_norm_kernel")  # registers the op
        _op = torch.ops.ldm.group_norm_nhwc
    return _op


class SiLUInNorm(nn.SiLU):
    """An `nn.SiLU` whose activation the GroupNorm before it applies: the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FusedGroupNorm(GroupNorm32):
    """GroupNorm32 computed by the Triton kernel where it can be, with the SiLU after it when `fuses_silu`."""

    fuses_silu: bool = False
    adds_shift = True  # forward takes `shift`: ResBlock passes the time embedding in

    def can_use_kernel(self, x: torch.Tensor) -> bool:
        """Whether `x` can take the kernel: CUDA, `b c h w` channels_last, half precision, no autograd. (Not
        `self.training`: a GroupNorm computes the same in either mode, and a network left in training mode, as
        run 9's benchmark network was, must not silently take the reference path.)"""
        return (x.is_cuda and x.ndim == 4 and x.dtype in _KERNEL_DTYPES
                and x.is_contiguous(memory_format=torch.channels_last)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """GroupNorm(x + shift) (shift `b c 1 1` or None), then SiLU when `fuses_silu`."""
        if self.can_use_kernel(x):
            shift = None if shift is None else shift.to(x.dtype).reshape(x.shape[0], x.shape[1])
            return _kernel_op()(x, self.weight, self.bias, self.num_groups, self.eps, self.fuses_silu, shift)
        h = super().forward(x if shift is None else x + shift)
        return F.silu(h) if self.fuses_silu else h


def narrowing_norms(network: nn.Module) -> set[int]:
    """ids of the first norms of ResBlocks whose input is wider than their output: a U-Net decoder's concatenated
    skips, 20-80 channels a group, which inductor reduces with strided loads 1.7-6.4x slower than the kernel (run 10:
    ~0.68 against ~0.21 ms for these 12 norms of the SD-1.5 step), and whose input the block writes out anyway for
    its 1x1 skip convolution (so the kernel costs inductor no fusion there)."""
    return {id(m.in_layers[0]) for m in network.modules()
            if isinstance(m, ResBlock) and m.in_layers[0].num_channels > m.out_layers[0].num_channels}


def use_fused_group_norm(network: nn.Module, enabled: bool = True, *, narrowing_only: bool = False) -> int:
    """Swap every GroupNorm32 of `network` for a FusedGroupNorm (taking the SiLU that follows it), or only those of
    `narrowing_norms`, or back when `enabled=False`; returns how many norms changed."""
    if not enabled:
        return _restore(network)
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        _kernel_op()  # registered now: a compile tracing the norms later finds it without an import (a graph break)
    count = 0
    chosen = narrowing_norms(network) if narrowing_only else None
    for module in network.modules():
        if type(module) is GroupNorm32 and (chosen is None or id(module) in chosen):
            module.__class__ = FusedGroupNorm  # same parameters: keys, hooks and devices unchanged
            count += 1
    apart = {id(m.out_layers) for m in network.modules() if isinstance(m, ResBlock) and m.use_scale_shift_norm}
    for parent in network.modules():
        if not isinstance(parent, nn.Sequential) or id(parent) in apart:  # scale-shift: modulated before the SiLU
            continue
        for norm, activation in zip(parent, list(parent)[1:]):
            if type(norm) is FusedGroupNorm and type(activation) is nn.SiLU:
                norm.fuses_silu = True
                activation.__class__ = SiLUInNorm
    return count


def _restore(network: nn.Module) -> int:
    count = 0
    for module in network.modules():
        if type(module) is FusedGroupNorm:
            module.__class__ = GroupNorm32
            module.__dict__.pop("fuses_silu", None)
            count += 1
        elif type(module) is SiLUInNorm:
            module.__class__ = nn.SiLU
    return count


def check_group_norm_kernel(device: torch.device | str) -> None:
    """The kernel needs triton on a CUDA device (elsewhere the fused norms run the reference path: no check)."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is None:
        raise LdmError("the GroupNorm kernel needs triton (pip install triton): drop --group-norm-kernel")


def uses_fused_group_norm(network: nn.Module) -> bool:
    """Whether any GroupNorm of `network` is a FusedGroupNorm."""
    return any(type(m) is FusedGroupNorm for m in network.modules())

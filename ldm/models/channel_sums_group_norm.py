"""GroupNorm written as per-channel sums, so that torch.compile reads NHWC maps along their channels (a lever).

Inductor lowers `F.group_norm` to a mean and variance over `(C/G) x H x W` per group. In channels_last a pixel holds
only C/G contiguous channels of a group (20 bytes at C=640 in bf16), so that reduction strides through memory: run
10's probe (`tools/probe_group_norm_kernel.py`) timed it at 98-177 us for the 640- and 960-channel 64x64 maps of the
SD-1.5 step, where 2-3x fewer bytes take 15 us at 320 channels. Written as below, the reduction is over H x W with
the channels contiguous (inductor's outer reduction, coalesced), the groups are merged on `n x C` numbers, and the
normalisation is one element-wise pass that inductor can still fuse with the SiLU and whatever precedes the norm
(a residual add, a time embedding), which a custom kernel cannot.

The statistics are float32 sums of `x - x[first pixel]` per channel (the shift keeps the squares from cancelling
when a channel's mean is large against its spread), merged into groups as Chan et al. (1979) merge variances.
`use_channel_sums_group_norm(network)` swaps every `GroupNorm32` for a `ChannelSumsGroupNorm` by class (same keys);
it computes this way only while torch.compile traces a 4-d channels_last input (eagerly it would launch ~10 kernels
where PyTorch's GroupNorm launches one), the plain GroupNorm otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.models.unet_blocks import GroupNorm32


def group_norm_channel_sums(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            eps: float) -> torch.Tensor:
    """GroupNorm of `n c h w` x from per-channel float32 sums; the result in x's dtype."""
    n, c = x.shape[:2]
    count = x[0, 0].numel()
    xf = x.float()
    first = xf[:, :, :1, :1]  # each channel's first pixel: the shift
    d = xf - first
    sums, squares = d.sum(dim=(2, 3)), (d * d).sum(dim=(2, 3))  # n c
    channel_mean = first.reshape(n, c) + sums / count
    channel_m2 = (squares - sums * sums / count).clamp_min(0.0)  # squared deviations from the channel's mean
    channel_mean, channel_m2 = channel_mean.reshape(n, groups, -1), channel_m2.reshape(n, groups, -1)
    mean = channel_mean.mean(dim=2, keepdim=True)
    m2 = channel_m2.sum(dim=2, keepdim=True) + count * (channel_mean - mean).square().sum(dim=2, keepdim=True)
    rstd = torch.rsqrt(m2 / (count * (c // groups)) + eps)  # n g 1
    scale = rstd.expand(n, groups, c // groups).reshape(n, c)
    if weight is not None:
        scale = scale * weight.float()
    offset = -mean.expand(n, groups, c // groups).reshape(n, c) * scale
    if bias is not None:
        offset = offset + bias.float()
    return (xf * scale[:, :, None, None] + offset[:, :, None, None]).to(x.dtype)


class ChannelSumsGroupNorm(GroupNorm32):
    """GroupNorm32 computed from per-channel sums while torch.compile traces a channels_last map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.compiler.is_compiling() and x.ndim == 4
                and x.is_contiguous(memory_format=torch.channels_last)):
            return group_norm_channel_sums(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def use_channel_sums_group_norm(network: nn.Module, enabled: bool = True) -> int:
    """Swap every GroupNorm32 of `network` for a ChannelSumsGroupNorm (or back); returns how many were swapped."""
    swapped = 0
    for module in network.modules():
        if enabled and type(module) is GroupNorm32:
            module.__class__ = ChannelSumsGroupNorm
            swapped += 1
        elif not enabled and type(module) is ChannelSumsGroupNorm:
            module.__class__ = GroupNorm32
            swapped += 1
    return swapped


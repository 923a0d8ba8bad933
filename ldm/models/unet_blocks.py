"""U-Net parts with CompVis key names: time embedding, ResBlock, Down/Upsample (Ho et al. 2020; ADM 2021)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `b -> b dim`, cosines first (CompVis order; Vaswani et al. 2017 sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and returned in the input's dtype (CompVis, 32 groups).

    When input and parameters share a half dtype, PyTorch's own kernel (CUDA and CPU) already accumulates the
    statistics and the affine map in float32 and rounds once at the end, which is what the explicit casts compute,
    without their two extra passes over the activation (the eager step's largest overhead against diffusers' plain
    GroupNorm). Mixed dtypes (fp32 parameters, half input outside autocast) take the explicit casts.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and self.weight.dtype == x.dtype:
            # .to: CUDA autocast runs group_norm in float32 (its fp32 list) and would hand back float32; a no-op else
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The 32-group norm used everywhere in the U-Net."""
    return GroupNorm32(32, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def batch_timesteps(timesteps: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Timesteps (or any per-sample scalar) as a `b` tensor on x's device; a scalar is repeated over the batch."""
    timesteps = torch.as_tensor(timesteps, device=x.device)
    return timesteps.expand(x.shape[0]) if timesteps.ndim == 0 else timesteps


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> None:
    """Switch gradient checkpointing of every block of `model` that has `use_checkpoint` (training mode only)."""
    for module in model.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = enabled


def maybe_checkpoint(module: nn.Module, fn, *args):
    """Run `fn(*args)` under non-reentrant gradient checkpointing when `module.use_checkpoint` and training."""
    if module.use_checkpoint and module.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding: `b c h w, b e -> b c' h w`.

    `skip_scale` multiplies the sum of shortcut and residual branch: 1/sqrt(2) keeps its variance that of each
    branch (Efficient U-Net, Saharia et al. 2022 App. B; NCSN++'s skip_rescale); 1 (SD's U-Net) leaves it out.
    ADM's options (Dhariwal & Nichol 2021, App. A; DeepFloyd IF): `use_scale_shift_norm` conditions by
    GroupNorm(h) * (1 + scale) + shift instead of adding the embedding; `up` / `down` resample inside the block
    (nearest / average pooling after the first norm and activation, on both branches); `activation` replaces SiLU.
    The options add no keys of their own (only emb_layers' width doubles under scale-shift).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_checkpoint: bool = False, skip_scale: float = 1.0, *, use_scale_shift_norm: bool = False,
                 up: bool = False, down: bool = False, activation: type[nn.Module] = nn.SiLU, eps: float = 1e-5):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.skip_scale = skip_scale
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels, eps), activation(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.resample = Upsample(channels, use_conv=False) if up else Downsample(channels, use_conv=False) if down \
            else None
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(activation(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels, eps), activation(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self, self._forward, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is None:
            h = self.in_layers(x)
        else:  # ADM: resample between the activation and the conv, and the shortcut alike
            h = self.in_layers[-1](self.resample(self.in_layers[:-1](x)))
            x = self.resample(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        elif getattr(self.out_layers[0], "adds_shift", False):  # ldm.models.fused_group_norm: the add in its kernel
            h = self.out_layers[1:](self.out_layers[0](h, emb_out))
        else:
            h = self.out_layers(h + emb_out)
        out = self.skip_connection(x) + h
        return out if self.skip_scale == 1.0 else out * self.skip_scale


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (`op`) to `out_channels`, or average pooling (`use_conv=False`)."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError(f"Downsample without a conv cannot change channels ({channels} -> {out_channels})")
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution (nearest), then a 3x3 conv (`conv`) to `out_channels` when `use_conv=True`."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError(f"Upsample without a conv cannot change channels ({channels} -> {out_channels})")
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x

"""SpatialTransformer: self-attention, cross-attention to the text and a GEGLU MLP (Rombach et al. 2022, sec. 3.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.models.attention import attention
from ldm.models.float8 import linear_for
from ldm.models.fused import share_qkv
from ldm.models.unet_blocks import maybe_checkpoint, normalization, zero_module


class CrossAttention(nn.Module):
    """Multi-head attention from `b n c` queries to `b m c_ctx` keys/values (self-attention when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.register_buffer("qkv_weight", None, persistent=False)  # set by ldm.models.fused.fuse_qkv

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        fused = self.qkv_weight
        if fused is not None and fused.data_ptr() != self.to_q.weight.data_ptr():
            share_qkv(self)  # a move or cast copied q, k, v apart from the fused matrix: share storage again
        return out

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if context is None and self.qkv_weight is not None and not (
                torch.is_grad_enabled() and self.to_q.weight.requires_grad):  # fused (inference): one product
            projections = linear_for(self.to_q)(x, self.qkv_weight).chunk(3, dim=-1)
        else:
            context = x if context is None else context
            projections = (self.to_q(x), self.to_k(context), self.to_v(context))
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in projections)
        out = attention(q, k, v, mask)  # mask: b m bool, True = attend
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU projection `b n c -> b n c'` (Shazeer 2020, eq. 6)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x expansion; keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention (attn1, absent when self_attention=False), cross-attention (attn2, absent when
    context_dim is None), GEGLU MLP.

    `disable_self_attn` (CompVis; diffusers' `only_cross_attention`, the SD x4 upscaler) makes attn1 a second
    cross-attention to the text: at high resolutions self-attention over every pixel is what costs the memory.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0,
                 use_checkpoint: bool = False, self_attention: bool = True, disable_self_attn: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.has_self_attention = self_attention
        self.disable_self_attn = disable_self_attn
        if disable_self_attn and context_dim is None:
            raise ValueError("disable_self_attn makes attn1 attend to the text: it needs a context_dim")
        if self_attention:
            self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head, dropout)
            self.norm1 = nn.LayerNorm(dim)
        if context_dim is not None:
            self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
            self.norm2 = nn.LayerNorm(dim)
        self.has_cross_attention = context_dim is not None
        self.ff = FeedForward(dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        return maybe_checkpoint(self, self._forward, x, context, context_mask)

    def _forward(self, x, context, context_mask):
        if self.has_self_attention and self.disable_self_attn:
            x = x + self.attn1(self.norm1(x), context, context_mask)
        elif self.has_self_attention:
            x = x + self.attn1(self.norm1(x))
        if self.has_cross_attention:
            if context is None:
                raise ValueError("this U-Net has cross-attention (context_dim is set): pass `context` (b n d)")
            x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: `b c h w -> b (h w) c -> blocks -> b c h w`, residual."""

    def __init__(self, in_channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, use_linear: bool = False, use_checkpoint: bool = False,
                 self_attention: bool = True, disable_self_attn: bool = False):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = normalization(in_channels, eps=1e-6)
        if use_linear:  # SD-2.x: projections act on tokens
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:  # SD-1.x: 1x1 convolutions
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout, use_checkpoint, self_attention,
                                  disable_self_attn)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        if self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h

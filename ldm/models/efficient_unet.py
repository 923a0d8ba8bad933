"""Imagen's Efficient U-Net for pixel-space text-to-image stages (Saharia et al. 2022, App. B, Figs. A.27-A.30).

Built from the Stable Diffusion U-Net's blocks (ResBlock, Downsample, Upsample, SpatialTransformer). What differs:
- per-level residual block counts, so parameters sit at the cheap low resolutions (e.g. 2, 4, 8, 8);
- a down level downsamples FIRST and then runs its ResBlocks; an up level runs its ResBlocks and upsamples LAST,
  so the expensive convolutions run at the lower resolution of each pair (App. B, "reverse the order");
- skip connections scaled by 1/sqrt(2): the *residual* sum inside every ResBlock, (shortcut + branch) / sqrt(2),
  as NeMo's Imagen and NCSN++'s skip_rescale do. That is the sum of two roughly independent unit-variance signals,
  so the scale keeps activations at unit variance through the deep stacks of ResBlocks. The U-Net's concatenated
  skip features (imagen-pytorch scales those) are not scaled: the next ResBlock's GroupNorm normalises each group of
  channels, and with 32 groups over two halves that are multiples of 32 channels a constant factor on one half is
  normalised away, leaving it to act only on the 1x1 shortcut;
- self-attention and text cross-attention only at the levels the config names (the 1024 px stage has none of the
  first and keeps the second);
- conditioning added to the time embedding: a pooled text embedding (masked mean of the tokens, or attention
  pooling) and, for super-resolution stages, the noise-conditioning augmentation level as a float.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.errors import ConfigError
from ldm.models.transformer import CrossAttention, SpatialTransformer
from ldm.models.unet import TimestepEmbedSequential
from ldm.models.unet_blocks import (
    Downsample,
    ResBlock,
    Upsample,
    batch_timesteps,
    normalization,
    set_gradient_checkpointing,
    timestep_embedding,
    zero_module,
)

AUG_LEVEL_SCALE = 1000.0  # levels in [0, 1] are embedded like timesteps in [0, 1000]: sinusoids need that range


@dataclass
class EfficientUNetConfig:
    """Efficient U-Net hyper-parameters; levels are indexed from the highest resolution (0) down."""

    in_channels: int = 3  # 6 for a super-resolution stage: the noisy image and the upsampled low-res image
    out_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int | tuple[int, ...] = (2, 4, 8, 8)  # per level, or one count for all
    attention_levels: tuple[int, ...] = (3,)  # levels with self-attention
    cross_attention_levels: tuple[int, ...] = (3,)  # levels with text cross-attention (needs context_dim)
    num_head_channels: int = 64  # channels per attention head
    transformer_depth: int = 1  # transformer blocks per attention layer
    context_dim: int | None = 4096  # text token width (T5-XXL: 4096); None = no text conditioning
    text_pooling: str = "mean"  # "mean" (masked mean of the tokens) | "attention" (a learned query attends)
    aug_level_conditioning: bool = False  # super-resolution stages: embed the augmentation level
    downsample_first_level: bool = True  # level 0 also downsamples (SR stages); False: level 0 runs at input size
    skip_scale: float = 2 ** -0.5  # scale of the residual sums in every ResBlock (see the module docstring)
    dropout: float = 0.0
    sample_size: int | None = 64  # resolution the stage generates at by default
    use_checkpoint: bool = False  # gradient checkpointing of ResBlocks and transformer blocks while training

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        self.cross_attention_levels = tuple(self.cross_attention_levels)
        n = len(self.channel_mult)
        if not isinstance(self.num_res_blocks, int):
            self.num_res_blocks = tuple(self.num_res_blocks)
            if len(self.num_res_blocks) != n:
                raise ConfigError(f"EfficientUNetConfig.num_res_blocks {self.num_res_blocks} needs one count per level "
                                  f"of channel_mult {self.channel_mult}")
        for name in ("attention_levels", "cross_attention_levels"):
            bad = [level for level in getattr(self, name) if not 0 <= level < n]
            if bad:
                raise ConfigError(f"EfficientUNetConfig.{name}: levels {bad} do not exist; channel_mult "
                                  f"{self.channel_mult} has levels 0..{n - 1}")
        if self.cross_attention_levels and self.context_dim is None:
            raise ConfigError("EfficientUNetConfig: cross_attention_levels need context_dim (the text token width)")
        if self.text_pooling not in ("mean", "attention"):
            raise ConfigError(f"EfficientUNetConfig.text_pooling: {self.text_pooling!r}; use 'mean' or 'attention'")
        for level, mult in enumerate(self.channel_mult):
            ch = self.model_channels * mult
            if ch % 32:
                raise ConfigError(f"EfficientUNetConfig: model_channels * channel_mult[{level}] = {ch} must be "
                                  "divisible by 32 (GroupNorm with 32 groups)")
            if level in self.attention_levels + self.cross_attention_levels and ch % self.num_head_channels:
                raise ConfigError(f"EfficientUNetConfig: {ch} channels at level {level} do not split into heads of "
                                  f"num_head_channels={self.num_head_channels}")

    @property
    def blocks_per_level(self) -> tuple[int, ...]:
        """num_res_blocks as one count per level."""
        n = self.num_res_blocks
        return (n,) * len(self.channel_mult) if isinstance(n, int) else n

    @property
    def downsample_factor(self) -> int:
        """How much smaller the lowest level is than the input (inputs must be a multiple of it)."""
        return 2 ** (len(self.channel_mult) - (0 if self.downsample_first_level else 1))


class AttentionPool(nn.Module):
    """Pool `b n d` tokens to `b d`: a learned query (plus the masked mean) attends over the unmasked tokens."""

    def __init__(self, dim: int, dim_head: int = 64):
        super().__init__()
        heads = max(dim // dim_head, 1)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.attn = CrossAttention(dim, dim, heads, dim // heads)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        query = self.query.to(tokens.dtype) + masked_mean(tokens, mask)[:, None]
        return self.attn(query, tokens, mask)[:, 0]


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `b n d` tokens over the positions where the bool `b n` mask is True."""
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def _embedding_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class EfficientUNet(nn.Module):
    """Efficient U-Net `b c h w, b -> b c' h w` (the module docstring lists what differs from SD's U-Net)."""

    def __init__(self, config: EfficientUNetConfig):
        super().__init__()
        self.config = c = config
        mc, ted = c.model_channels, c.model_channels * 4
        channels = [mc * mult for mult in c.channel_mult]
        levels = len(channels)

        def res_block(ch_in, ch_out):
            return ResBlock(ch_in, ted, c.dropout, ch_out, c.use_checkpoint, c.skip_scale)

        def attention(ch, level):
            self_attn, cross_attn = level in c.attention_levels, level in c.cross_attention_levels
            if not (self_attn or cross_attn):
                return []
            return [SpatialTransformer(ch, ch // c.num_head_channels, c.num_head_channels, c.transformer_depth,
                                       c.context_dim if cross_attn else None, c.dropout, use_linear=True,
                                       use_checkpoint=c.use_checkpoint, self_attention=self_attn)]

        self.time_embed = _embedding_mlp(mc, ted)
        if c.aug_level_conditioning:
            self.aug_level_embed = _embedding_mlp(mc, ted)
        if c.context_dim is not None:
            if c.text_pooling == "attention":
                self.text_pool = AttentionPool(c.context_dim, c.num_head_channels)
            self.text_embed = nn.Sequential(nn.LayerNorm(c.context_dim), _embedding_mlp(c.context_dim, ted))

        self.input_conv = nn.Conv2d(c.in_channels, mc, 3, padding=1)
        # Down level l: [Downsample], ResBlocks, [attention]; its output is the skip that up level l receives.
        self.down_blocks = nn.ModuleList()
        ch = mc
        for level, ch_out in enumerate(channels):
            layers = []
            if level or c.downsample_first_level:
                layers.append(Downsample(ch, out_channels=ch_out))
            elif ch != ch_out:
                layers.append(nn.Conv2d(ch, ch_out, 3, padding=1))
            layers += [res_block(ch_out, ch_out) for _ in range(c.blocks_per_level[level])]
            layers += attention(ch_out, level)
            self.down_blocks.append(TimestepEmbedSequential(*layers))
            ch = ch_out

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), *attention(ch, levels - 1), res_block(ch, ch))

        # Up level l: ResBlocks on [h, skip_l], [attention], then Upsample to level l-1's channels and size.
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            ch_out = channels[level]
            layers = [res_block(ch + ch_out, ch_out)]
            layers += [res_block(ch_out, ch_out) for _ in range(c.blocks_per_level[level] - 1)]
            layers += attention(ch_out, level)
            ch_next = channels[level - 1] if level else mc
            if level or c.downsample_first_level:
                layers.append(Upsample(ch_out, out_channels=ch_next))
            elif ch_out != ch_next:
                layers.append(nn.Conv2d(ch_out, ch_next, 3, padding=1))
            self.up_blocks.append(TimestepEmbedSequential(*layers))
            ch = ch_next

        # The input conv's full-resolution features reach the output through one last ResBlock (imagen-pytorch's
        # final_resnet_block): with every level downsampling first, nothing else runs at full resolution.
        self.final_block = res_block(ch + mc, mc)
        self.out = nn.Sequential(normalization(mc), nn.SiLU(), zero_module(nn.Conv2d(mc, c.out_channels, 3, padding=1)))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Switch gradient checkpointing of every ResBlock and transformer block (takes effect in training mode)."""
        set_gradient_checkpointing(self, enabled)

    def embed(self, x: torch.Tensor, timesteps, context, context_mask, aug_level) -> torch.Tensor:
        """The `b e` conditioning embedding: time + pooled text + augmentation level."""
        c = self.config
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(batch_timesteps(timesteps, x), c.model_channels).to(dtype))
        if c.aug_level_conditioning:
            if aug_level is None:
                raise ValueError("this network is a super-resolution stage (aug_level_conditioning): pass "
                                 "`aug_level`, the noise-conditioning augmentation level in [0, 1]")
            # A float all the way: rounding the level (imagen-pytorch's cast to long) would erase it.
            level = batch_timesteps(aug_level, x).to(torch.float32) * AUG_LEVEL_SCALE
            emb = emb + self.aug_level_embed(timestep_embedding(level, c.model_channels).to(dtype))
        elif aug_level is not None:
            raise ValueError("this network has no augmentation-level embedding (aug_level_conditioning: false); "
                             "do not pass `aug_level`")
        if c.context_dim is not None:
            if context is None:
                raise ValueError(f"this network is text-conditioned (context_dim={c.context_dim}): pass `context`")
            pooled = (self.text_pool(context, context_mask) if hasattr(self, "text_pool")
                      else masked_mean(context, context_mask))
            emb = emb + self.text_embed(pooled.to(dtype))
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, y: torch.Tensor | None = None,
                aug_level: torch.Tensor | float | None = None) -> torch.Tensor:
        """Output for x `b c h w` (SR: noisy image and upsampled low-res image concatenated) at `timesteps` `b`.

        `context` `b n d` are the text tokens and `context_mask` `b n` (True = a real token) their padding mask;
        `aug_level` `b` (or a scalar) is the conditioning image's augmentation level, a float in [0, 1].
        """
        if y is not None:
            raise ValueError("EfficientUNet takes no `y`: it pools the text tokens (`context`) itself")
        factor = self.config.downsample_factor
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"EfficientUNet: input size {tuple(x.shape[-2:])} must be a multiple of {factor}")
        if context is not None and context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        emb = self.embed(x, timesteps, context, context_mask, aug_level)

        h = self.input_conv(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        h = self.final_block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def count_parameters(config: EfficientUNetConfig) -> int:
    """Number of parameters of the network `config` describes, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in EfficientUNet(config).parameters())


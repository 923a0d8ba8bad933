"""DeepFloyd IF's pixel U-Net (stages I and II): ADM's network with T5 tokens joining the image tokens in attention.

What differs from Stable Diffusion's U-Net (the blocks are ldm's own: `ResBlock`, `normalization`, `attention`):
- residual blocks with scale-shift normalisation that also down- and upsample (ADM's `resblock_updown`,
  Dhariwal & Nichol 2021; diffusers' `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D`), GELU activations;
- `SimpleCrossAttention` instead of a transformer: the projected T5 tokens are prepended to the image tokens as
  keys and values of one attention (diffusers' `SimpleCrossAttn*` blocks, `AttnAddedKVProcessor`);
- the T5 tokens (`context_dim`, 4096 for T5-XXL) are projected to `cross_attention_dim` once (`context_proj`);
- an attention-pooled text embedding is added to the time embedding (`text_pool`, diffusers' `TextTimeEmbedding`);
- IF-II embeds the noise level of its low-resolution input like a timestep (`aug_level_embed`);
- learned-range variance: 2 * out_channels outputs (Nichol & Dhariwal 2021).

The U-Net gets no text mask: diffusers' IF pipelines pass none, so the padded T5 positions are attended and pooled
(docs/deepfloyd-if.md). `context_mask` is accepted, as every ldm network takes it, and not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ldm.diffusion.noise_augmentation import if_noise_level_from_level
from ldm.errors import ConfigError
from ldm.models.attention import attention
from ldm.models.unet_blocks import (
    ResBlock,
    batch_timesteps,
    normalization,
    set_gradient_checkpointing,
    timestep_embedding,
    zero_module,
)

ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}
CONTEXT_NORMS = (None, "group_norm", "layer_norm")


@dataclass
class IFUNetConfig:
    """IF U-Net hyper-parameters; levels are indexed from the highest resolution (0) down."""

    in_channels: int = 3  # IF-II: 6, the noisy image and the upsampled, noised low-resolution image
    out_channels: int = 3
    learn_sigma: bool = True  # 2 * out_channels outputs: eps and the variance interpolation
    block_channels: tuple[int, ...] = (448, 896, 1344, 1792)  # width per level (diffusers' block_out_channels)
    layers_per_block: int | tuple[int, ...] = 3  # ResBlocks per down level (up levels have one more)
    attention_levels: tuple[int, ...] = (1, 2, 3)  # levels with SimpleCrossAttention (the middle always has one)
    attention_head_dim: int = 64
    context_dim: int = 4096  # T5 token width (diffusers' encoder_hid_dim)
    cross_attention_dim: int = 4096  # width of the projected tokens the attention reads
    context_norm: str | None = "group_norm"  # normalisation of the projected tokens in each attention
    text_pool_heads: int = 64  # heads of the attention pooling (diffusers' addition_embed_type_num_heads)
    time_embed_dim: int | None = None  # None: 4 * block_channels[0]
    time_embed_act: str | None = None  # an activation on the summed embedding (IF-II: "gelu")
    activation: str = "gelu"
    aug_level_conditioning: bool = False  # IF-II: embed the noise level of the low-resolution input
    mid_block_scale: float = 1.0  # the middle ResBlocks divide their residual sums by this (IF-II: 1.414)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    sample_size: int | None = 64  # pixels the stage generates at by default
    use_checkpoint: bool = False  # gradient checkpointing of the ResBlocks while training

    def __post_init__(self):
        self.block_channels = tuple(self.block_channels)
        self.attention_levels = tuple(self.attention_levels)
        n = len(self.block_channels)
        if not isinstance(self.layers_per_block, int):
            self.layers_per_block = tuple(self.layers_per_block)
            if len(self.layers_per_block) != n:
                raise ConfigError(f"IFUNetConfig.layers_per_block {self.layers_per_block} needs one count per level "
                                  f"of block_channels {self.block_channels}")
        bad = [level for level in self.attention_levels if not 0 <= level < n]
        if bad:
            raise ConfigError(f"IFUNetConfig.attention_levels: levels {bad} do not exist (levels 0..{n - 1})")
        for name, value, options in (("activation", self.activation, tuple(ACTIVATIONS)),
                                     ("time_embed_act", self.time_embed_act, (None, *ACTIVATIONS)),
                                     ("context_norm", self.context_norm, CONTEXT_NORMS)):
            if value not in options:
                raise ConfigError(f"IFUNetConfig.{name}={value!r}; use one of {list(options)}")
        for level, ch in enumerate(self.block_channels):
            if ch % 32:
                raise ConfigError(f"IFUNetConfig: block_channels[{level}] = {ch} must be divisible by 32 (GroupNorm)")
            if ch % self.attention_head_dim:
                raise ConfigError(f"IFUNetConfig: {ch} channels at level {level} do not split into heads of "
                                  f"attention_head_dim={self.attention_head_dim}")
        if self.context_dim % self.text_pool_heads:
            raise ConfigError(f"IFUNetConfig: context_dim {self.context_dim} does not split into text_pool_heads="
                              f"{self.text_pool_heads} heads")

    @property
    def blocks_per_level(self) -> tuple[int, ...]:
        n = self.layers_per_block
        return (n,) * len(self.block_channels) if isinstance(n, int) else n

    @property
    def embed_dim(self) -> int:
        return self.time_embed_dim or 4 * self.block_channels[0]

    @property
    def downsample_factor(self) -> int:
        """How much smaller the lowest level is than the input (inputs must be a multiple of it)."""
        return 2 ** (len(self.block_channels) - 1)


class SimpleCrossAttention(nn.Module):
    """Self-attention over `b c h w` pixels whose keys and values also hold the text tokens `b n d`, residual.

    softmax(q [k_text; k_img]^T / sqrt(d)) [v_text; v_img], text first (diffusers' AttnAddedKVProcessor; IF's
    `encoder_kv`), after a GroupNorm of the image and (optionally) of the tokens.
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int, context_norm: str | None = "group_norm"):
        super().__init__()
        self.heads = channels // head_dim
        self.norm = normalization(channels, 1e-5)  # diffusers' Attention: eps 1e-5 whatever the U-Net's norm_eps
        if context_norm == "group_norm":
            self.norm_context = normalization(context_dim, 1e-5)
        elif context_norm == "layer_norm":
            self.norm_context = nn.LayerNorm(context_dim)
        self.context_norm = context_norm
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_k_context, self.to_v_context = (nn.Linear(context_dim, channels) for _ in range(2))
        self.to_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        if self.context_norm == "group_norm":
            context = self.norm_context(context.transpose(1, 2)).transpose(1, 2)
        elif self.context_norm == "layer_norm":
            context = self.norm_context(context)
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")
        k = torch.cat([self.to_k_context(context), self.to_k(h)], dim=1)
        v = torch.cat([self.to_v_context(context), self.to_v(h)], dim=1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (self.to_q(h), k, v))
        out = self.to_out(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=height, w=width)


class TextAttentionPool(nn.Module):
    """IF's pooled text embedding `b n d -> b e`: LayerNorm, attention pooling (CLIP's AttentionPool2d over tokens:
    the mean token plus a learned position embedding queries [mean; tokens]), a projection, LayerNorm."""

    def __init__(self, dim: int, out_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_in = nn.LayerNorm(dim)
        self.positional_embedding = nn.Parameter(torch.randn(1, dim) / dim**0.5)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(tokens)
        query = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)
        x = torch.cat([query, x], dim=1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.q_proj(query), self.k_proj(x), self.v_proj(x)))
        pooled = rearrange(attention(q, k, v), "b h n d -> b n (h d)")[:, 0]
        return self.norm_out(self.proj(pooled))


class IFSequential(nn.Sequential):
    """Hands the time embedding to ResBlocks and the projected text to SimpleCrossAttention."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SimpleCrossAttention):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _mlp(in_dim: int, out_dim: int, activation: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), activation(), nn.Linear(out_dim, out_dim))


class IFUNet(nn.Module):
    """IF's U-Net `b c h w, b -> b 2c h w` (the module docstring lists what it adds to SD's U-Net)."""

    def __init__(self, config: IFUNetConfig):
        super().__init__()
        self.config = c = config
        act = ACTIVATIONS[c.activation]
        ch0, emb = c.block_channels[0], c.embed_dim

        def res_block(ch_in, ch_out, **kwargs):
            return ResBlock(ch_in, emb, c.dropout, ch_out, c.use_checkpoint, use_scale_shift_norm=True,
                            activation=act, eps=c.norm_eps, **kwargs)

        def attn(ch):
            return SimpleCrossAttention(ch, c.cross_attention_dim, c.attention_head_dim, c.context_norm)

        self.time_embed = _mlp(ch0, emb, act)
        if c.aug_level_conditioning:
            self.aug_level_embed = _mlp(ch0, emb, act)
        self.text_pool = TextAttentionPool(c.context_dim, emb, c.text_pool_heads)
        self.context_proj = nn.Linear(c.context_dim, c.cross_attention_dim)

        # ADM's layout: input block 0 is the conv; then per level its ResBlocks (+ attention), and a downsampling
        # ResBlock as a block of its own between levels. Every input block's output is a skip.
        self.input_blocks = nn.ModuleList([IFSequential(nn.Conv2d(c.in_channels, ch0, 3, padding=1))])
        skips, ch, last = [ch0], ch0, len(c.block_channels) - 1
        for level, ch_out in enumerate(c.block_channels):
            for _ in range(c.blocks_per_level[level]):
                layers = [res_block(ch, ch_out)]
                ch = ch_out
                if level in c.attention_levels:
                    layers.append(attn(ch))
                self.input_blocks.append(IFSequential(*layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(IFSequential(res_block(ch, ch, down=True)))
                skips.append(ch)

        mid_scale = 1.0 / c.mid_block_scale
        self.middle_block = IFSequential(res_block(ch, ch, skip_scale=mid_scale), attn(ch),
                                         res_block(ch, ch, skip_scale=mid_scale))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(c.block_channels))):
            ch_out = c.block_channels[level]
            for i in range(c.blocks_per_level[level] + 1):
                layers = [res_block(ch + skips.pop(), ch_out)]
                ch = ch_out
                if level in c.attention_levels:
                    layers.append(attn(ch))
                if level and i == c.blocks_per_level[level]:
                    layers.append(res_block(ch, ch, up=True))
                self.output_blocks.append(IFSequential(*layers))

        out_channels = c.out_channels * (2 if c.learn_sigma else 1)
        self.out = nn.Sequential(normalization(ch, c.norm_eps), act(),
                                 zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Switch gradient checkpointing of every ResBlock (takes effect in training mode)."""
        set_gradient_checkpointing(self, enabled)

    def embed(self, x: torch.Tensor, timesteps, context: torch.Tensor, aug_level) -> torch.Tensor:
        """The `b e` embedding: time (+ the low-res input's noise level) + pooled text, in diffusers' order."""
        c = self.config
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(batch_timesteps(timesteps, x), c.block_channels[0]).to(dtype))
        if c.aug_level_conditioning:
            if aug_level is None:
                raise ValueError("this IF U-Net is a super-resolution stage (aug_level_conditioning): pass "
                                 "`aug_level`, the augmentation level of its low-resolution input in [0, 1]")
            # ldm's level -> IF's noise_level timestep (exact at IF's integer levels), embedded like a timestep
            noise_level = if_noise_level_from_level(batch_timesteps(aug_level, x)).float()
            emb = emb + self.aug_level_embed(timestep_embedding(noise_level, c.block_channels[0]).to(dtype))
        elif aug_level is not None:
            raise ValueError("this IF U-Net has no noise-level embedding (aug_level_conditioning: false); "
                             "do not pass `aug_level`")
        emb = emb + self.text_pool(context.to(dtype))
        if c.time_embed_act is not None:
            emb = ACTIVATIONS[c.time_embed_act]()(emb)
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, y: torch.Tensor | None = None,
                aug_level: torch.Tensor | float | None = None) -> torch.Tensor:
        """Output `b 2c h w` ([eps | variance]) for x `b c h w` (IF-II: noisy and low-res images concatenated).

        `context` `b n d` are the T5 tokens; `context_mask` is not used (see the module docstring); `aug_level` `b`
        (or a scalar) is IF-II's augmentation level in [0, 1].
        """
        if y is not None:
            raise ValueError("IFUNet takes no `y`: it pools the text tokens (`context`) itself")
        if context is None:
            raise ValueError(f"IFUNet is text-conditioned: pass `context` (b n {self.config.context_dim})")
        factor = self.config.downsample_factor
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"IFUNet: input size {tuple(x.shape[-2:])} must be a multiple of {factor}")
        emb = self.embed(x, timesteps, context, aug_level)
        context = self.context_proj(context.to(emb.dtype))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

"""The text-conditioned U-Net of Stable Diffusion with CompVis/Stability state-dict keys (Rombach et al. 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.errors import ConfigError
from ldm.models.micro_conditioning import micro_embedding, micro_width
from ldm.models.transformer import SpatialTransformer
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


@dataclass
class UNetConfig:
    """U-Net hyper-parameters under CompVis names; the defaults are SD-1.x."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors (1, 2, 4, ...) that get a transformer
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8  # heads per transformer; -1 = derive from num_head_channels
    num_head_channels: int = -1  # channels per head; -1 = derive from num_heads
    transformer_depth: int | tuple[int, ...] = 1  # blocks per transformer, or one count per level
    context_dim: int | None = 768  # text embedding width; None = no cross-attention
    use_linear_in_transformer: bool = False  # SD-2.x: linear proj_in/proj_out instead of 1x1 convs
    num_classes: int | None = None  # class-conditional: nn.Embedding added to the time embedding
    adm_in_channels: int | None = None  # pooled-embedding width projected and added to the time embedding (sgm)
    learn_sigma: bool = False  # output 2 * out_channels: eps and the variance interpolation (Nichol & Dhariwal 2021)
    dropout: float = 0.0
    sample_size: int | None = 64  # latent size the model was trained at: the default generation size (SD-1: 64)
    use_checkpoint: bool = False  # gradient checkpointing of ResBlocks and transformer blocks while training
    conv_resample: bool = True  # convolutions in Downsample/Upsample (False: avg-pool / plain nearest)
    # per level: attn1 attends to the text instead of the pixels (SD x4 upscaler; diffusers' only_cross_attention)
    disable_self_attentions: tuple[bool, ...] | None = None
    disable_middle_self_attn: bool = False  # the same for the middle block's transformer
    # SDXL: numbers embedded beside the pooled text in `label_emb` (ldm.models.micro_conditioning), each into
    # micro_conditioning_dim sinusoids; adm_in_channels = pooled width + numbers * micro_conditioning_dim
    micro_conditioning: tuple[str, ...] = ()
    micro_conditioning_dim: int = 256

    def __post_init__(self):
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.channel_mult = tuple(self.channel_mult)
        self.micro_conditioning = tuple(self.micro_conditioning)
        if self.micro_conditioning:
            extra = micro_width(self.micro_conditioning) * self.micro_conditioning_dim
            if self.adm_in_channels is None or self.adm_in_channels <= extra:
                raise ConfigError(f"UNetConfig: micro_conditioning {list(self.micro_conditioning)} adds {extra} "
                                  f"inputs to label_emb; adm_in_channels={self.adm_in_channels} must be the pooled "
                                  "text width plus that")
        if not isinstance(self.transformer_depth, int):
            self.transformer_depth = tuple(self.transformer_depth)
            if len(self.transformer_depth) != len(self.channel_mult):
                raise ConfigError(f"UNetConfig.transformer_depth {self.transformer_depth} needs one entry per level "
                                  f"of channel_mult {self.channel_mult}")
        if self.disable_self_attentions is not None:
            self.disable_self_attentions = tuple(bool(v) for v in self.disable_self_attentions)
            if len(self.disable_self_attentions) != len(self.channel_mult):
                raise ConfigError(f"UNetConfig.disable_self_attentions {self.disable_self_attentions} needs one entry "
                                  f"per level of channel_mult {self.channel_mult}")
        if (self.disable_self_attentions and any(self.disable_self_attentions) or self.disable_middle_self_attn) \
                and self.context_dim is None:
            raise ConfigError("UNetConfig: disable_self_attentions makes attention attend to the text; it needs a "
                              "context_dim")
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ConfigError("UNetConfig: set exactly one of num_heads and num_head_channels (the other to -1), "
                              f"got num_heads={self.num_heads}, num_head_channels={self.num_head_channels}")
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ConfigError("UNetConfig: num_classes and adm_in_channels both use `label_emb`; set only one")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % 32:
                raise ConfigError(f"UNetConfig: model_channels * channel_mult = {self.model_channels * mult} must be "
                                  "divisible by 32 (GroupNorm with 32 groups)")

    @property
    def depth_per_level(self) -> tuple[int, ...]:
        """transformer_depth as one count per level."""
        d = self.transformer_depth
        return (d,) * len(self.channel_mult) if isinstance(d, int) else d

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of a transformer acting on `channels` channels."""
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, channels // self.num_heads
        else:
            heads, dim_head = channels // self.num_head_channels, self.num_head_channels
        if heads * dim_head != channels:
            raise ConfigError(f"UNetConfig: {channels} channels do not split into heads (num_heads={self.num_heads}, "
                              f"num_head_channels={self.num_head_channels})")
        return heads, dim_head


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x, emb, context=None, context_mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """U-Net `b c h w, b -> b c' h w` with time, class/pooled and cross-attention conditioning (CompVis layout)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        mc, ted = c.model_channels, c.model_channels * 4
        depth = c.depth_per_level

        def block_kwargs():
            return {"dropout": c.dropout, "use_checkpoint": c.use_checkpoint}

        def transformer(ch, level_depth, no_self_attn=False):
            heads, dim_head = c.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, level_depth, c.context_dim, c.dropout,
                                      c.use_linear_in_transformer, c.use_checkpoint, disable_self_attn=no_self_attn)

        no_self_attn = c.disable_self_attentions or (False,) * len(c.channel_mult)

        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, ted)
        elif c.adm_in_channels is not None:
            mlp = nn.Sequential(nn.Linear(c.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            self.label_emb = nn.Sequential(mlp)  # keys label_emb.0.0 / label_emb.0.2 as in sgm

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, ted, out_channels=mc * mult, **block_kwargs())]
                ch = mc * mult
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, depth[level], no_self_attn[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, c.conv_resample)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, **block_kwargs()), transformer(ch, depth[-1], c.disable_middle_self_attn),
            ResBlock(ch, ted, **block_kwargs()),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, out_channels=mc * mult, **block_kwargs())]
                ch = mc * mult
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, depth[level], no_self_attn[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch, c.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        out_channels = c.out_channels * (2 if c.learn_sigma else 1)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(mc, out_channels, 3, padding=1)))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Switch gradient checkpointing of every ResBlock and transformer block (takes effect in training mode)."""
        set_gradient_checkpointing(self, enabled)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                micro: torch.Tensor | None = None) -> torch.Tensor:
        """Output for x `b c h w` at timesteps `b` (or a scalar), text `context` `b n d`, `y`, `context_mask` `b n`,
        and SDXL's micro-conditioning numbers `micro` `b k`."""
        t_emb = timestep_embedding(batch_timesteps(timesteps, x), self.config.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if hasattr(self, "label_emb"):
            if y is None:
                raise ValueError("this U-Net is class/pooled-conditioned (num_classes or adm_in_channels): pass `y`")
            y = y if self.config.num_classes is not None else y.to(emb.dtype)
            if self.config.micro_conditioning:  # SDXL: the pooled text, then the embedded sizes (sgm's `vector`)
                if micro is None:
                    raise ValueError(f"this U-Net is micro-conditioned on {list(self.config.micro_conditioning)}: "
                                     "pass `micro`")
                y = torch.cat([y, micro_embedding(micro, self.config.micro_conditioning_dim).to(y)], dim=1)
            emb = emb + self.label_emb(y).to(emb.dtype)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)

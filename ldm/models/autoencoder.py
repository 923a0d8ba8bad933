"""KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3), CompVis key layout."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ldm.errors import ConfigError
from ldm.models.autoencoder_blocks import Decoder, Encoder


@dataclass
class AutoencoderConfig:
    """CompVis `ddconfig` plus the latent scaling (`z_model = (z - shift_factor) * scale_factor`)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    resolution: int = 256
    dropout: float = 0.0
    scale_factor: float = 0.18215
    shift_factor: float = 0.0
    norm_groups: int = 32  # GroupNorm groups (32 in every published checkpoint; smaller for tiny test models)
    force_upcast: bool = False  # runs in float32 under half-precision sampling (SDXL's VAE overflows in fp16)


class DiagonalGaussian:
    """Posterior N(mean, diag(std^2)) from `b 2c h w` moments; log-variance clamped to [-30, 20] as CompVis."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised draw mean + std * eps."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The most likely latent (the mean)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over `c h w`, shape `b`."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `sample` summed over `c h w`, shape `b`."""
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Image <-> latent autoencoder; state-dict keys equal CompVis `first_stage_model.*` without the prefix."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        config = config or AutoencoderConfig()
        if any(config.ch * m % config.norm_groups for m in (1, *config.ch_mult)):
            raise ConfigError(f"AutoencoderConfig: ch={config.ch} x ch_mult={config.ch_mult} must be divisible by "
                              f"norm_groups={config.norm_groups}")
        self.config = config
        shared = dict(ch=config.ch, ch_mult=tuple(config.ch_mult), num_res_blocks=config.num_res_blocks,
                      attn_resolutions=tuple(config.attn_resolutions), resolution=config.resolution,
                      z_channels=config.z_channels, dropout=config.dropout, groups=config.norm_groups)
        self.encoder = Encoder(in_channels=config.in_channels, double_z=config.double_z, **shared)
        self.decoder = Decoder(out_ch=config.out_ch, **shared)
        moments = 2 * config.z_channels if config.double_z else config.z_channels
        self.quant_conv = nn.Conv2d(moments, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction from image to latent."""
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the diffusion model sees."""
        return self.config.embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """`b c H W` image in [-1, 1] -> posterior over `b embed_dim H/f W/f`."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent `b embed_dim h w` -> image `b out_ch h*f w*f`."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (the training pass)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample: bool = True) -> torch.Tensor:
        """Image -> diffusion-space latent (z - shift_factor) * scale_factor."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scale_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latent -> image: decode(z / scale_factor + shift_factor)."""
        return self.decode(z / self.config.scale_factor + self.config.shift_factor)

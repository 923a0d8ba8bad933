"""Codecs: the map between images and the space a denoiser works in.

The contract: `encode(x, generator=None) -> z` (a posterior draw from `generator`, its mode without one),
`decode(z) -> x`, `downsample_factor` and `latent_channels`. Latent models use the KL autoencoder (`KLCodec`),
pixel models (Imagen, DeepFloyd IF) the identity (`IdentityCodec`).
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.models.autoencoder import AutoencoderKL


class KLCodec(nn.Module):
    """The KL autoencoder in diffusion space: z = (latent - shift_factor) * scale_factor (AutoencoderConfig)."""

    def __init__(self, autoencoder: AutoencoderKL):
        super().__init__()
        self.autoencoder = autoencoder

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image `b 3 h w` in [-1, 1] -> diffusion-space latent: a posterior draw from `generator`, else the mode."""
        posterior = self.autoencoder.encode(x.to(self._dtype))
        z = posterior.mode()
        if generator is not None:
            # Drawn on the generator's device and moved, as diffusers' randn_tensor does: a CPU generator gives the
            # same draw whatever the model's device.
            noise = torch.randn(z.shape, generator=generator, device=generator.device, dtype=z.dtype)
            z = posterior.mean + posterior.std * noise.to(z.device)
        c = self.autoencoder.config
        return ((z - c.shift_factor) * c.scale_factor).to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latent -> image `b 3 h w` in about [-1, 1]."""
        return self.autoencoder.decode_latents(z.to(self._dtype))  # a float32 VAE under fp16 sampling


class IdentityCodec(nn.Module):
    """A pixel-space model's codec: the denoiser works on the image itself."""

    downsample_factor = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

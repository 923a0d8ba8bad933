"""The latent upscale start strategy: a latent super-resolution stage (the SD x4 upscaler) upscaling an image.

Sampling starts from noise at the low-resolution image's own size (the autoencoder's factor is the upscale
factor); the image, noised at `noise_level` on its own schedule (`ldm.diffusion.latent_upscale`), goes beside the
latent as `concat` and the level as the class label `y`. The draws come in diffusers' order (the image's noise,
then the latent's), so the same seed gives `StableDiffusionUpscalePipeline`'s image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.diffusion.conditioning import add_conditioning
from ldm.diffusion.latent_upscale import LatentUpscaleConfig, check_noise_level, noise_low_res
from ldm.errors import LdmError
from ldm.pipeline.strategies import Start, draw_noise, initial_noise


class Float32Codec(nn.Module):
    """A codec run in float32 whatever the stage's dtype: the x4 upscaler's autoencoder overflows in float16 (its
    x4-upscaling.yaml says the decoder breaks in half precision; diffusers upcasts it, `force_upcast`)."""

    def __init__(self, codec: nn.Module):
        super().__init__()
        self.inner = codec.float()

    downsample_factor = property(lambda self: self.inner.downsample_factor)
    latent_channels = property(lambda self: self.inner.latent_channels)
    autoencoder = property(lambda self: self.inner.autoencoder)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inner.encode(x.float(), generator).to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(z.float()).to(z.dtype)


@dataclass
class LatentUpscale:
    """Upscale `low_res` (`b c h w` in [-1, 1]; one image or one per sample) at the integer `noise_level`."""

    low_res: torch.Tensor
    noise_level: int
    config: LatentUpscaleConfig

    def __post_init__(self):
        check_noise_level(self.noise_level, self.config.max_noise_level)

    def start(self, stage, shape, plan, cond, denoiser, generator) -> Start:
        low_res = self.low_res.to(stage.device, stage.dtype)
        if tuple(low_res.shape[2:]) != tuple(shape[2:]):
            raise LdmError(f"the x4 stage's latent is {shape[3]}x{shape[2]}, but the image to upscale is "
                           f"{low_res.shape[3]}x{low_res.shape[2]}: the output must be {stage.codec.downsample_factor}"
                           " times the input")
        # diffusers noises the image (one draw per image, repeated for the batch) before drawing the latent
        noise = draw_noise(tuple(low_res.shape), generator, stage)
        levels = torch.full((low_res.shape[0],), self.noise_level, dtype=torch.long, device=stage.device)
        image = noise_low_res(low_res, noise, levels, self.config)
        if image.shape[0] != shape[0]:
            image = image.repeat_interleave(shape[0] // image.shape[0], dim=0)
        x = initial_noise(shape, generator, stage) * plan.init_noise_scale
        labels = torch.full((shape[0],), self.noise_level, dtype=torch.long, device=stage.device)
        return Start(x, plan, add_conditioning(cond, concat=image, y=labels), denoiser)

"""Training inputs of a latent upscaler (the SD x4 upscaler): the low-res image is made from the sample itself.

Per sample: the target downsampled by the autoencoder's factor (so the low-res image has the latent's size), a noise
level drawn uniformly in 0..max_noise_level - 1 (CompVis `ImageConcatWithNoiseAugmentation`), the image noised on
its own schedule (`ldm.diffusion.latent_upscale.noise_low_res`, the path sampling uses); the network gets it beside
the noisy latent (`concat`) and the level as its class label (`y`).
"""
from __future__ import annotations

import torch

from ldm.diffusion.latent_upscale import LatentUpscaleConfig, noise_low_res, sample_noise_levels
from ldm.diffusion.noise_augmentation import downsample


def low_res_of(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The low-res input of `b c h w` targets in [-1, 1]: antialiased bicubic, `factor` times smaller."""
    return downsample(images, (images.shape[-2] // factor, images.shape[-1] // factor))


def latent_upscale_inputs(images: torch.Tensor, config: LatentUpscaleConfig, factor: int, seeds: list[int],
                          device: torch.device) -> dict:
    """The network's extra arguments for targets `images`: `concat` (the noised low-res image) and `y` (its level),
    each sample's level and noise drawn from its own seed."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]  # CPU: the same draws on every device
    low_res = low_res_of(images.float(), factor)
    levels = torch.cat([sample_noise_levels(1, config, generator=g) for g in generators])
    noise = torch.stack([torch.randn(low_res.shape[1:], generator=g) for g in generators])
    concat = noise_low_res(low_res, noise, levels, config)
    return {"concat": concat.to(device), "y": levels.to(device)}

"""Start strategies: where a stage's sampling begins, and what they add to its conditioning.

`strategy.start(stage, shape, plan, cond, denoiser, generator) -> Start`. Each draws from `generator` in the order
diffusers' pipeline of the same name does (posterior samples and the initial noise), so the same seed gives the same
image. Text-to-image starts from noise; img2img from the noised image part-way down the schedule; inpainting with a
9-channel U-Net feeds the mask and masked image beside x, other U-Nets blend the known region into each estimate.
A super-resolution stage is one more strategy: the low-resolution image concatenated beside x.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torch.nn import functional as F

from ldm.diffusion.conditioning import add_conditioning
from ldm.diffusion.plans import SamplingPlan
from ldm.pipeline.images import from_pil, mask_from_pil
from ldm.pipeline.settings import first_step
from ldm.runtime import randn


@dataclass
class Start:
    """The initial x (VE coordinates, at `plan.sigmas[0]`), the plan to run, and the conditioning and denoiser."""

    x: torch.Tensor
    plan: SamplingPlan
    cond: dict
    denoiser: Callable


def draw_noise(shape: tuple[int, ...], generator, stage) -> torch.Tensor:
    """The initial noise exactly as diffusers draws it: one CPU randn of the full shape (or of each image, from
    `ldm.runtime.ImageGenerators`), then moved."""
    return randn(shape, generator, stage.dtype).to(stage.device)


def initial_noise(shape: tuple[int, ...], generator, stage) -> torch.Tensor:
    """`draw_noise` in the sampler's precision, to be scaled by sigma: in float16, randn * 20291 (the cosine
    schedule's sigma_max) overflows wherever |randn| > 3.2."""
    return draw_noise(shape, generator, stage).to(stage.sample_dtype)


class TextToImage:
    """Start from pure noise: x_T = randn * plan.init_noise_scale."""

    def start(self, stage, shape, plan: SamplingPlan, cond: dict, denoiser, generator) -> Start:
        return Start(initial_noise(shape, generator, stage) * plan.init_noise_scale, plan, cond, denoiser)


def noised_start(known: torch.Tensor, noise: torch.Tensor, plan: SamplingPlan, steps: int, strength: float):
    """The plan without its first steps, and the known latent noised to its first sigma (diffusers' add_noise)."""
    plan = plan.skip(first_step(steps, strength))
    return known + plan.sigmas[0].to(known.device) * noise, plan


@dataclass
class ImageToImage:
    """SDEdit (Meng et al. 2022): noise the encoded image to the sigma `strength` of the way up, then denoise."""

    image: Image.Image
    strength: float

    def start(self, stage, shape, plan, cond, denoiser, generator) -> Start:
        pixels = from_pil(self.image, _pixel_size(stage, shape)).to(stage.device, stage.dtype)
        known = stage.codec.encode(pixels, generator).repeat(shape[0], 1, 1, 1)  # one draw, repeated for the batch
        x, plan = noised_start(known, initial_noise(shape, generator, stage), plan, len(plan.sigmas) - 1,
                               self.strength)
        return Start(x, plan, cond, denoiser)


@dataclass
class Inpainting:
    """Repaint where the mask is white: a 9-channel U-Net takes [x, mask, masked-image latent]; any other U-Net gets
    the known region blended into each x0 estimate. Strength 1 starts from noise, less from the noised image."""

    image: Image.Image
    mask: Image.Image
    strength: float = 1.0

    def start(self, stage, shape, plan, cond, denoiser, generator) -> Start:
        size = _pixel_size(stage, shape)
        pixels = from_pil(self.image, size).to(stage.device, stage.dtype)
        mask = mask_from_pil(self.mask, size).to(stage.device, stage.dtype)
        small = F.interpolate(mask, size=shape[2:]).repeat(shape[0], 1, 1, 1)
        concat = stage.unet.config.in_channels == 2 * shape[1] + 1  # SD's 9-channel inpainting U-Net
        # As diffusers: a 9-channel U-Net encodes the image (one posterior draw) before the noise unless it starts
        # from pure noise, and the masked image after it. Blending keeps the posterior mode: diffusers blends
        # differently (noised latents after each step), and the mode is the latent the image stands for.
        known = None
        if not concat:
            known = stage.codec.encode(pixels).repeat(shape[0], 1, 1, 1)
        elif self.strength < 1.0:
            known = stage.codec.encode(pixels, generator).repeat(shape[0], 1, 1, 1)
        noise = initial_noise(shape, generator, stage)
        if self.strength < 1.0:
            x, plan = noised_start(known, noise, plan, len(plan.sigmas) - 1, self.strength)
        else:
            x = noise * plan.init_noise_scale
        if not concat:
            return Start(x, plan, cond, blend_known(denoiser, known, keep=1 - small))
        masked = stage.codec.encode(pixels * (mask < 0.5), generator).repeat(shape[0], 1, 1, 1)
        return Start(x, plan, add_conditioning(cond, concat=torch.cat([small, masked], dim=1)), denoiser)


def blend_known(denoiser: Callable, known_x0: torch.Tensor, keep: torch.Tensor) -> Callable:
    """Masked blending for ordinary checkpoints: where `keep` is 1 the denoiser returns the known latent."""

    def blended(x, sigma, cond):
        return keep * known_x0 + (1 - keep) * denoiser(x, sigma, cond)

    return blended


def _pixel_size(stage, shape) -> tuple[int, int]:
    f = stage.codec.downsample_factor
    return shape[2] * f, shape[3] * f


def strategy_for(init_image: Image.Image | None, mask_image: Image.Image | None, strength: float | None):
    """The start strategy of a call: text-to-image, img2img (`init_image`) or inpainting (`init_image` + mask)."""
    if init_image is None:
        return TextToImage()
    if mask_image is None:
        return ImageToImage(init_image, strength)
    return Inpainting(init_image, mask_image, strength)

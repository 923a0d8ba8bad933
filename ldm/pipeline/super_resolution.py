"""The super-resolution start strategy: a cascade stage that sees the previous stage's image (Saharia et al. 2022).

Sampling starts from noise like text-to-image; the low-resolution image, upsampled to the stage's size and augmented
at a fixed level (`ldm.diffusion.noise_augmentation.conditioning_image`, the path training uses), is concatenated
beside x (`concat`, fed by `ConcatNetwork`), and the level reaches the network as a float (`aug_level`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.diffusion.conditioning import add_conditioning
from ldm.diffusion.noise_augmentation import aug_alpha_sigma, conditioning_image
from ldm.pipeline.strategies import Start, draw_noise, initial_noise


@dataclass
class SuperResolution:
    """Upscale `low_res` (`b c h w` in [-1, 1]; one image or one per sample) with the level `aug_level` in [0, 1]."""

    low_res: torch.Tensor
    aug_level: float
    resize_mode: str = "bicubic"

    def __post_init__(self):
        aug_alpha_sigma(self.aug_level)  # a level outside [0, 1] is an LdmError now, not mid-sampling

    def start(self, stage, shape, plan, cond, denoiser, generator) -> Start:
        x = initial_noise(shape, generator, stage) * plan.init_noise_scale  # first, as text-to-image draws it
        low_res = self.low_res.to(stage.device, stage.dtype)
        if low_res.shape[0] != shape[0]:
            low_res = low_res.repeat_interleave(shape[0] // low_res.shape[0], dim=0)
        noise = draw_noise((shape[0], low_res.shape[1], *shape[2:]), generator, stage)  # the augmentation's noise
        image = conditioning_image(low_res, tuple(shape[2:]), self.aug_level, noise, self.resize_mode)
        level = torch.full((shape[0],), float(self.aug_level), device=stage.device)  # float32: never rounded
        return Start(x, plan, add_conditioning(cond, concat=image, aug_level=level), denoiser)

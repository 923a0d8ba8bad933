"""The super-resolution start strategy: a cascade stage that sees the previous stage's image (Saharia et al. 2022).

The low-resolution image, upsampled to the stage's size and augmented at a fixed level
(`ldm.diffusion.noise_augmentation.conditioning_image`, the path training uses), is concatenated beside x
(`concat`, fed by `ConcatNetwork`), and the level reaches the network as a float (`aug_level`).

Where sampling starts is the start strength s. At 1 (Imagen's) it starts from pure noise, like text-to-image. Below
1 it starts part-way down the schedule, as img2img does (SDEdit, Meng et al. 2022): from the clean upsampled image
(the resize the conditioning is built from, not the augmented one) noised to the sigma s of the way up, and runs
int(steps * s) steps. The colours then come from the upsampled image and the network adds the detail.

The generator draws, in this order and at every strength: the initial noise (shape of x), then the augmentation's
noise. So a seed's conditioning image is the same at every strength, and strength 1 is the old path exactly.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ldm.diffusion.conditioning import add_conditioning
from ldm.diffusion.noise_augmentation import aug_alpha_sigma, conditioning_image, upsample
from ldm.errors import LdmError
from ldm.pipeline.strategies import Start, draw_noise, initial_noise, noised_start


def check_start_strength(strength, flag: str = "--upscale-strength") -> None:
    """Refuse a start strength outside (0, 1] before any work, naming the flag it came from."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) \
            or not 0.0 < strength <= 1.0:
        raise LdmError(f"{flag} must lie in (0, 1] (1 = start the SR stage from pure noise, as Imagen; 0.3 = from "
                       f"the upsampled image noised 30% of the way up), got {strength}")


def check_steps_left(strength: float, steps: int, where: str = "the SR stage",
                     flag: str = "--upscale-strength") -> None:
    """Refuse a strength that leaves no step: the stage runs int(steps * strength) of its steps."""
    if int(steps * strength) == 0:
        raise LdmError(f"{where} starts at strength {strength:g} with {steps} steps, which leaves no step to run "
                       f"(int({steps} * {strength:g}) = 0): give it more steps or a higher {flag}")


@dataclass
class SuperResolution:
    """Upscale `low_res` (`b c h w` in [-1, 1]; one image or one per sample) with the level `aug_level` in [0, 1],
    starting at `strength` in (0, 1] (1: from pure noise)."""

    low_res: torch.Tensor
    aug_level: float
    resize_mode: str = "bicubic"
    strength: float = 1.0

    def __post_init__(self):
        aug_alpha_sigma(self.aug_level)  # a level outside [0, 1] is an LdmError now, not mid-sampling
        check_start_strength(self.strength)

    def start(self, stage, shape, plan, cond, denoiser, generator) -> Start:
        noise = initial_noise(shape, generator, stage)  # first, as text-to-image draws it; the sampler's precision
        low_res = self.low_res.to(stage.device, stage.dtype)
        if low_res.shape[0] != shape[0]:
            low_res = low_res.repeat_interleave(shape[0] // low_res.shape[0], dim=0)
        aug_noise = draw_noise((shape[0], low_res.shape[1], *shape[2:]), generator, stage)
        image = conditioning_image(low_res, tuple(shape[2:]), self.aug_level, aug_noise, self.resize_mode)
        if self.strength < 1.0:
            check_steps_left(self.strength, len(plan.sigmas) - 1)
            known = upsample(low_res, tuple(shape[2:]), self.resize_mode).to(noise.dtype)  # clean: not the augmented image
            x, plan = noised_start(known, noise, plan, len(plan.sigmas) - 1, self.strength)
        else:
            x = noise * plan.init_noise_scale
        level = torch.full((shape[0],), float(self.aug_level), device=stage.device)  # float32: never rounded
        return Start(x, plan, add_conditioning(cond, concat=image, aug_level=level), denoiser)

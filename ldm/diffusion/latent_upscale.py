"""A latent super-resolution stage's low-resolution conditioning: the SD x4 upscaler (Stability AI 2022).

The low-resolution RGB image (in [-1, 1], at the latent's own size: the autoencoder's factor 4 is the upscale
factor) is noised with its own discrete VP schedule at an integer `noise_level` (0..max_noise_level - 1 in
training; 20 by default when sampling), concatenated beside the latent as 3 extra input channels, and the level
reaches the U-Net as its class label (`num_classes`). CompVis calls this `ImageConcatWithNoiseAugmentation`;
diffusers' `StableDiffusionUpscalePipeline` a `low_res_scheduler`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import ConfigError, LdmError

SECTION = "latent_upscale"  # the model config's section (native config.yaml, and ModelParts.config)
# diffusers' StableDiffusionUpscalePipeline defaults, which are the x4 upscaler's.
DEFAULT_STEPS = 75
DEFAULT_GUIDANCE = 9.0


@dataclass
class LatentUpscaleConfig:
    """The low-resolution image's noise schedule and levels (CompVis `low_scale_config`)."""

    noise_level: int = 20  # the level used when sampling (diffusers' default)
    max_noise_level: int = 350  # levels are 0..max_noise_level - 1 in training; sampling refuses more
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "scaled_linear"  # CompVis' "linear" (square roots spaced linearly)

    def __post_init__(self):
        if not 0 < self.max_noise_level <= self.num_train_timesteps:
            raise ConfigError(f"latent_upscale.max_noise_level={self.max_noise_level} must lie in "
                              f"1..num_train_timesteps={self.num_train_timesteps}")
        check_noise_level(self.noise_level, self.max_noise_level, what="latent_upscale.noise_level")
        self.schedule()  # an unknown beta_schedule is a ConfigError now

    def schedule(self) -> ScheduleConfig:
        """The low-resolution image's noise schedule."""
        return ScheduleConfig(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                              beta_end=self.beta_end, beta_schedule=self.beta_schedule)

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar of the low-resolution schedule, float32 as diffusers' DDPMScheduler builds it."""
        return torch.cumprod(1 - self.schedule().betas(), dim=0)


def check_noise_level(level, max_noise_level: int, what: str = "--noise-level") -> None:
    """Refuse a level that is not an integer in [0, max_noise_level] (diffusers' check)."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= max_noise_level:
        raise LdmError(f"{what} must be an integer timestep of the low-resolution schedule in 0..{max_noise_level} "
                       f"(the x4 upscaler's default is 20), got {level!r}")


def noise_low_res(image: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
                  config: LatentUpscaleConfig) -> torch.Tensor:
    """sqrt(alpha_bar[level]) image + sqrt(1 - alpha_bar[level]) noise, per sample (`levels` `b`, long)."""
    alphas_cumprod = config.alphas_cumprod().to(image.device, image.dtype)[levels.to(image.device)]
    alpha = (alphas_cumprod**0.5).view(-1, *([1] * (image.ndim - 1)))
    sigma = ((1 - alphas_cumprod) ** 0.5).view(-1, *([1] * (image.ndim - 1)))
    return alpha * image + sigma * noise


def sample_noise_levels(batch: int, config: LatentUpscaleConfig, *, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Training-time levels, uniform over 0..max_noise_level - 1 (CompVis draws them per sample)."""
    return torch.randint(0, config.max_noise_level, (batch,), generator=generator, device=device)

"""Noise-conditioning augmentation of a super-resolution stage's low-resolution image (Saharia et al. 2022, Sec. 2.5).

The augmentation level is a float in [0, 1] on a variance-preserving path with no offset:

    alpha = cos(pi/2 * level),  sigma = sin(pi/2 * level),  augmented = alpha * image + sigma * noise,

so level 0 is exactly the identity (alpha = 1, sigma = 0) and level 1 is pure noise. The peers leave noise at their
lowest level: imagen-pytorch's linear log-SNR schedule has sigma = 0.01 at t = 0, DeepFloyd IF's squaredcos_cap_v2
schedule sigma = 0.0064 at noise_level 0. `level_from_if_noise_level` and `level_from_imagen_pytorch` map their
settings onto these levels (same alpha and sigma). Images are in [-1, 1].
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.diffusion.schedules import cosine_betas
from ldm.errors import ConfigError, LdmError

RESIZE_MODES = ("bicubic", "bilinear", "nearest", "bilinear_align_corners")  # the last: DeepFloyd IF-II


SAMPLING_DEFAULTS = ("steps", "guidance", "sampler")  # a model's own sampling defaults: all a latent model's
# `stage` section may hold (StageConfig's last three fields)


@dataclass
class StageConfig:
    """What a pixel cascade stage needs besides its networks: sizes, noise augmentation, dynamic thresholding; and
    any model's own sampling defaults (steps, guidance, sampler: all a latent model's `stage` section may set)."""

    resolution: int = 64  # output size in pixels (a square)
    low_res_size: int | None = None  # SR stage: size of the previous stage's images; None: a base stage
    aug_level: float = 0.0  # SR stage: the fixed augmentation level used at sampling, in [0, 1]
    train_aug_level_max: float = 1.0  # SR stage: training draws levels uniformly in [0, train_aug_level_max]
    train_crop_size: int | None = None  # train on random crops of the target this size (1024 stage: 256)
    resize_mode: str = "bicubic"  # how the low-res image is upsampled to the resolution
    # SR stage: where sampling starts. 1 = from pure noise (Imagen); s < 1 = from the upsampled low-res image noised
    # to the sigma s of the way up, running int(steps * s) steps (SDEdit, as img2img's strength)
    start_strength: float = 1.0
    dynamic_threshold: float | None = 0.995  # percentile of |x0| for dynamic thresholding; None: off
    dynamic_threshold_max: float | None = None  # cap on the threshold s (DeepFloyd IF: 1.5 stage I, 1.0 stage II)
    steps: int | None = None  # the stage's own sampling defaults where the user gives none (IF: 100 / 50 steps)
    guidance: float | None = None  # (IF: 7 / 4)
    sampler: str | None = None  # (IF: ddpm, its DDPMScheduler)

    def __post_init__(self):
        for name in ("aug_level", "train_aug_level_max"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"stage.{name}={getattr(self, name)} is outside [0, 1] (0 = no augmentation)")
        if not 0.0 < self.start_strength <= 1.0:
            raise ConfigError(f"stage.start_strength={self.start_strength} must lie in (0, 1] (1 = start from pure "
                              "noise, as Imagen; 0.3 = from the upsampled image noised 30% of the way up)")
        if self.low_res_size is not None and not 0 < self.low_res_size < self.resolution:
            raise ConfigError(f"stage.low_res_size={self.low_res_size} must be between 0 and stage.resolution="
                              f"{self.resolution}")
        if self.train_crop_size is not None:
            if self.low_res_size is None:
                raise ConfigError("stage.train_crop_size is for super-resolution stages: set stage.low_res_size too")
            if not 0 < self.train_crop_size <= self.resolution or self.train_crop_size * self.low_res_size % \
                    self.resolution:
                raise ConfigError(f"stage.train_crop_size={self.train_crop_size} must be at most the resolution and "
                                  f"map to whole low-res pixels (x {self.low_res_size}/{self.resolution})")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"stage.resize_mode={self.resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or
                                       self.steps <= 0):
            raise ConfigError(f"stage.steps={self.steps} must be a positive number of sampling steps, or null")
        if self.dynamic_threshold_max is not None and not self.dynamic_threshold_max >= 1.0:
            raise ConfigError(f"stage.dynamic_threshold_max={self.dynamic_threshold_max} must be at least 1 (the "
                              "threshold is never below 1), or null for no cap")
        if self.dynamic_threshold is not None and not 0.0 < self.dynamic_threshold <= 1.0:
            raise ConfigError(f"stage.dynamic_threshold={self.dynamic_threshold} must be a percentile in (0, 1] "
                              "(e.g. 0.995), or null for none")


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def downsample(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic downsampling of `b c h w` images in [-1, 1] to `size` (clamped: bicubic overshoots)."""
    out = F.interpolate(image.float(), size=_size(size), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(-1, 1).to(image.dtype)


def upsample(image: torch.Tensor, size: int | tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Upsample `b c h w` images in [-1, 1] to `size` (bicubic, as SR3 and Imagen's SR stages; clamped)."""
    corners = {} if mode == "nearest" else {"align_corners": mode == "bilinear_align_corners"}
    mode = "bilinear" if mode == "bilinear_align_corners" else mode
    out = F.interpolate(image.float(), size=_size(size), mode=mode, **corners)
    return out.clamp(-1, 1).to(image.dtype)


def low_res_condition(image: torch.Tensor, low_size: int | tuple[int, int],
                      out_size: int | tuple[int, int] | None = None, mode: str = "bicubic") -> torch.Tensor:
    """The un-augmented conditioning image of a training sample: down to `low_size`, back up to `out_size`."""
    return upsample(downsample(image, low_size), out_size or tuple(image.shape[-2:]), mode)


def aug_alpha_sigma(level: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) = (cos, sin)(pi/2 * level) in float64; level 0 gives exactly (1, 0)."""
    level = torch.as_tensor(level, dtype=torch.float64)
    if level.numel() and (level.min() < 0 or level.max() > 1):
        raise LdmError(f"augmentation level {level.min().item():g}..{level.max().item():g} is outside [0, 1] "
                       "(0 = the exact low-res image, 1 = pure noise)")
    angle = level * (math.pi / 2)
    return torch.cos(angle), torch.sin(angle)


def augment(image: torch.Tensor, level: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """Variance-preserving noise at `level` (a float or `b`): alpha image + sigma noise; level 0 returns `image`."""
    alpha, sigma = aug_alpha_sigma(level)
    shape = (-1,) + (1,) * (image.ndim - 1) if alpha.ndim else ()
    alpha, sigma = (v.reshape(shape).to(image.device, image.dtype) for v in (alpha, sigma))
    return alpha * image + sigma * noise


def conditioning_image(low_res: torch.Tensor, size: int | tuple[int, int], level: torch.Tensor | float,
                       noise: torch.Tensor, mode: str = "bicubic") -> torch.Tensor:
    """What an SR stage sees at sampling: the previous stage's `low_res` images upsampled to `size`, augmented."""
    return augment(upsample(low_res, size, mode), level, noise)


def training_conditioning_image(image: torch.Tensor, low_size: int | tuple[int, int], level: torch.Tensor | float,
                                noise: torch.Tensor, mode: str = "bicubic") -> torch.Tensor:
    """What an SR stage sees in training: its target `image` downsampled, then exactly the sampling-time path."""
    return conditioning_image(downsample(image, low_size), tuple(image.shape[-2:]), level, noise, mode)


def sample_aug_levels(batch: int, max_level: float = 1.0, *, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Training-time levels: one per sample, uniform in [0, max_level] (Sec. 2.5: randomly sampled while training)."""
    return torch.rand(batch, generator=generator, device=device) * max_level


def level_from_log_snr(log_snr: torch.Tensor | float) -> torch.Tensor:
    """The level with the same alpha and sigma as a VP point of log-SNR log(alpha^2 / sigma^2)."""
    log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
    return torch.atan(torch.exp(-log_snr / 2)) * (2 / math.pi)


def level_from_if_noise_level(noise_level: int | torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DeepFloyd IF's `noise_level` (0..999 timesteps of squaredcos_cap_v2; default 250) as a level.

    IF noises with alphas_cumprod[noise_level] of the cosine betas; level = (2/pi) atan2(sqrt(1 - acp), sqrt(acp))
    gives the same alpha and sigma, close to (noise_level / 1000 + 0.008) / 1.008 (the cosine schedule's offset s).
    """
    alphas_cumprod = torch.cumprod(1 - cosine_betas(num_train_timesteps), dim=0)  # float32, as diffusers builds it
    acp = alphas_cumprod[torch.as_tensor(noise_level, dtype=torch.long)].double()
    return torch.atan2((1 - acp).sqrt(), acp.sqrt()) * (2 / math.pi)


@functools.lru_cache(maxsize=4)
def _if_levels(num_train_timesteps: int) -> torch.Tensor:
    """The level of each of IF's integer noise levels (float64, increasing); computed once per schedule length."""
    return level_from_if_noise_level(torch.arange(num_train_timesteps), num_train_timesteps)


def if_noise_level_from_level(level: torch.Tensor | float, num_train_timesteps: int = 1000,
                              snap: float = 1e-4) -> torch.Tensor:
    """The inverse of `level_from_if_noise_level`: IF's noise_level timestep (a float) with the same alpha and sigma.

    Linear between IF's integer levels; within `snap` of an integer it is that integer exactly, so a float32 level
    of noise_level 250 gives back 250 (what IF-II's noise-level embedding was trained on).
    """
    level = torch.as_tensor(level)
    table = _if_levels(num_train_timesteps).to(level.device)
    x = level.double().clamp(float(table[0]), float(table[-1]))
    low = (torch.searchsorted(table, x.contiguous(), right=True) - 1).clamp(0, num_train_timesteps - 2)
    t = low + (x - table[low]) / (table[low + 1] - table[low])
    nearest = t.round()
    return torch.where((t - nearest).abs() < snap, nearest, t)


def level_from_imagen_pytorch(t: torch.Tensor | float) -> torch.Tensor:
    """imagen-pytorch's `lowres_sample_noise_level` t (default 0.2) on its linear log-SNR schedule as a level.

    Its schedule is log_snr(t) = -log(expm1(1e-4 + 10 t^2)) (Kingma et al. 2021's continuous linear betas).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    return level_from_log_snr(-torch.log(torch.expm1(1e-4 + 10 * t**2)))

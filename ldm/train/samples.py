"""Sample images during training through the generation pipeline's own sampling function (`ldm.pipeline.sampling`).

A preview of prompt p with seed s is therefore the image `ldm-txt2img` makes from the exported model with the same
sampler, steps, guidance and seed.
"""
from __future__ import annotations

import contextlib

import torch
from PIL import Image

from ldm.diffusion.noise_augmentation import downsample, upsample
from ldm.errors import ConfigError, LdmError
from ldm.pipeline.images import to_pil
from ldm.pipeline.latent_upscale import LatentUpscale
from ldm.pipeline.sampling import sample
from ldm.pipeline.settings import GenerationSettings, check_settings
from ldm.pipeline.stage import Stage
from ldm.pipeline.super_resolution import SuperResolution
from ldm.train.config import SamplingConfig
from ldm.train.latent_upscale import low_res_of
from ldm.train.model import LatentDiffusionParts


def check_preview_settings(parts: LatentDiffusionParts, config: SamplingConfig) -> None:
    """The grids' sampler, steps and guidance against the model's schedule, as the grids will check them: before
    the first training step, not at the first grid (with `sampling.every: 0` the end of the run, before the export)."""
    if not config.prompts:
        return
    settings = GenerationSettings(sampler=config.sampler, steps=config.steps, guidance=config.guidance,
                                  seed=config.seed)
    try:
        check_settings(settings, factor=1, schedule_config=parts.schedule, conditional=parts.text_encoder is not None)
    except LdmError as e:
        raise ConfigError(f"sampling (the training's sample grids): {e}") from e


@contextlib.contextmanager
def preview_stage(parts: LatentDiffusionParts, config: SamplingConfig, size: int, device: torch.device):
    """(stage, checked settings) for a preview of `size` px; the networks' training modes are restored after."""
    unet, text_encoder = parts.unet, parts.text_encoder
    modes = [(m, m.training) for m in (unet, text_encoder) if m is not None]
    try:
        stage = Stage(unet, parts.schedule, parts.codec, text_encoder, device=device,
                      dtype=next(unet.parameters()).dtype, stage_config=parts.stage,
                      latent_upscale=parts.latent_upscale)
        settings = GenerationSettings(sampler=config.sampler, steps=config.steps, guidance=config.guidance,
                                      seed=config.seed, height=size, width=size)
        check_settings(settings, factor=1, schedule_config=parts.schedule, conditional=stage.conditional)
        yield stage, settings
    finally:
        for module, training in modes:  # the stage put them in eval mode
            module.train(training)


@torch.no_grad()
def sample_images(parts: LatentDiffusionParts, prompts: list[str], config: SamplingConfig, latent_size: int,
                  device: torch.device) -> list[Image.Image]:
    """One image per prompt, seeded by `config.seed` (prompt i of the list uses the i-th row of one noise draw)."""
    with preview_stage(parts, config, latent_size * parts.codec.downsample_factor, device) as (stage, settings):
        return to_pil(sample(stage, list(prompts), settings), check=False)  # a diverged run shows black, not a crash


@torch.no_grad()
def upscale_references(parts: LatentDiffusionParts, images: torch.Tensor, captions: list[str],
                       config: SamplingConfig, device: torch.device) -> list[Image.Image]:
    """An SR stage's preview: per training image, its low-res input (nearest-upsampled), the upscaled sample and the
    ground truth, in rows of three; sampled at the stage's fixed `aug_level` (a latent upscaler: its `noise_level`)
    through the pipeline's sampling, from pure noise whatever `stage.start_strength` says: the preview shows what the
    network itself has learned, colours included."""
    if parts.latent_upscale is not None:
        truth = images.float()
        low_res = low_res_of(truth, parts.codec.downsample_factor)
        with preview_stage(parts, config, truth.shape[-1], device) as (stage, settings):
            strategy = LatentUpscale(low_res, parts.latent_upscale.noise_level, parts.latent_upscale)
            upscaled = sample(stage, list(captions), settings, strategy=strategy)
        return _rows(low_res, upscaled, truth)
    stage_config = parts.stage
    truth = center_crop(images.float(), stage_config.train_crop_size or images.shape[-1])
    size = truth.shape[-1]
    low_res = downsample(truth, size * stage_config.low_res_size // stage_config.resolution)
    with preview_stage(parts, config, size, device) as (stage, settings):
        strategy = SuperResolution(low_res, stage_config.aug_level, stage_config.resize_mode)
        upscaled = sample(stage, list(captions), settings, strategy=strategy)
    return _rows(low_res, upscaled, truth)


def _rows(low_res: torch.Tensor, upscaled: torch.Tensor, truth: torch.Tensor) -> list[Image.Image]:
    """Rows of three: the low-res input (nearest-upsampled), the upscaled sample, the ground truth."""
    shown = upsample(low_res, truth.shape[-1], mode="nearest")
    rows = [row for triple in zip(shown, upscaled, truth) for row in triple]
    return to_pil(torch.stack([r.to(shown) for r in rows]), check=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central `size` x `size` crop (an SR stage that trains on crops previews one crop per image)."""
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    return images[..., top: top + size, left: left + size]

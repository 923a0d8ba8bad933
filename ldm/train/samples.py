"""Sample images during training through the generation pipeline's own sampling function (`ldm.pipeline.sampling`).

A preview of prompt p with seed s is therefore the image `ldm-txt2img` makes from the exported model with the same
sampler, steps, guidance and seed.
"""
from __future__ import annotations

import torch
from PIL import Image

from ldm.pipeline.images import to_pil
from ldm.pipeline.sampling import sample
from ldm.pipeline.settings import GenerationSettings, check_settings
from ldm.pipeline.stage import Stage
from ldm.train.config import SamplingConfig
from ldm.train.model import LatentDiffusionParts


@torch.no_grad()
def sample_images(parts: LatentDiffusionParts, prompts: list[str], config: SamplingConfig, latent_size: int,
                  device: torch.device) -> list[Image.Image]:
    """One image per prompt, seeded by `config.seed` (prompt i of the list uses the i-th row of one noise draw)."""
    unet, text_encoder = parts.unet, parts.text_encoder
    modes = [(m, m.training) for m in (unet, text_encoder) if m is not None]
    try:
        stage = Stage(unet, parts.schedule, parts.codec, text_encoder, device=device,
                      dtype=next(unet.parameters()).dtype)
        size = latent_size * stage.codec.downsample_factor
        settings = GenerationSettings(sampler=config.sampler, steps=config.steps, guidance=config.guidance,
                                      seed=config.seed, height=size, width=size)
        check_settings(settings, factor=1, schedule_config=parts.schedule, conditional=stage.conditional)
        return to_pil(sample(stage, list(prompts), settings), check=False)  # a diverged run shows black, not a crash
    finally:
        for module, training in modes:  # the stage put them in eval mode
            module.train(training)

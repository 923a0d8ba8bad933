"""Sample images during training: text -> guided sampler over the (EMA) denoiser -> autoencoder decode."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ldm.diffusion.denoiser import build_denoiser
from ldm.diffusion.guidance import cfg
from ldm.diffusion.plans import sampling_plan
from ldm.diffusion.sampler_registry import SAMPLERS
from ldm.errors import ConfigError
from ldm.train.config import SamplingConfig
from ldm.train.model import LatentDiffusionParts, text_conditioning


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """`b 3 h w` in [-1, 1] -> PIL images."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in x]


@torch.no_grad()
def sample_images(parts: LatentDiffusionParts, prompts: list[str], config: SamplingConfig, latent_size: int,
                  device: torch.device) -> list[Image.Image]:
    """One image per prompt, seeded by `config.seed` (prompt i of the list uses the i-th row of one noise draw)."""
    if config.sampler not in SAMPLERS:
        raise ConfigError(f"sampling.sampler {config.sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
    unet, autoencoder = parts.unet, parts.autoencoder
    was_training = unet.training
    unet.eval()
    try:
        denoiser = build_denoiser(unet, parts.schedule)  # discrete (eps / v / x0) or EDM
        use_mask = parts.text_encoder_config.type == "t5"
        cond = text_conditioning(parts.text_encoder.encode(list(prompts)), unet.config, use_mask)
        cond = {k: v.to(device) for k, v in cond.items()}
        if config.guidance > 1.0:
            uncond = text_conditioning(parts.text_encoder.encode([""] * len(prompts)), unet.config, use_mask)
            cond = {"cond": cond, "uncond": {k: v.to(device) for k, v in uncond.items()}}
            denoiser = cfg(denoiser, config.guidance)
        plan = sampling_plan(parts.schedule, config.sampler, config.steps)
        generator = torch.Generator("cpu").manual_seed(config.seed)
        shape = (len(prompts), autoencoder.latent_channels, latent_size, latent_size)
        x = torch.randn(shape, generator=generator).to(device) * plan.init_noise_scale
        x = SAMPLERS[config.sampler](denoiser, x, plan.sigmas.to(device), cond, generator=generator,
                                     disable_progress=True)
        dtype = next(autoencoder.parameters()).dtype
        return to_images(autoencoder.decode_latents((x * plan.final_scale).to(dtype)))
    finally:
        unet.train(was_training)

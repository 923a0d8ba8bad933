"""The one sampling function: `pipe()`, `generate_to_folder`, ldm-eval and the training previews all draw through it.

settings -> seeded generator -> plan -> conditioning (+ CFG) -> start strategy -> sampler -> codec decode.
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.diffusion.guidance import cfg
from ldm.diffusion.plans import sampling_plan
from ldm.diffusion.sampler_registry import run_sampler
from ldm.errors import LdmError
from ldm.pipeline.settings import GenerationSettings
from ldm.pipeline.stage import Stage
from ldm.pipeline.strategies import TextToImage
from ldm.runtime import ImageGenerators, seeded_generator


@torch.no_grad()
def sample(stage: Stage, prompts: list[str], settings: GenerationSettings, *,
           negative_prompts: list[str | None] | None = None, cond: dict | None = None, strategy=None,
           wrappers: tuple = (), seeds: list[int] | None = None,
           callback: Callable | None = None, progress: bool = False, decode: bool = True) -> torch.Tensor:
    """Images `b c h w` (about [-1, 1]) for `prompts`, each `settings.n` times, from one draw of `settings.seed`.

    `cond`: conditioning already built (`stage.conditioning`), e.g. the one text embedding a cascade's stages share.
    `strategy` picks the start (default text-to-image); `wrappers` (denoiser -> denoiser) apply after CFG, e.g.
    `classifier_guidance`; dynamic thresholding comes first, from `settings.dynamic_threshold` (None: the stage's
    default, on for pixel models). Settings are assumed checked (`check_settings`).
    `seeds`: one per image (`len(prompts) * settings.n`) in place of `settings.seed`: image k then draws all its noise
    from `seeds[k]` alone, so it is the image of a batch of one with that seed (text-to-image and super-resolution
    starts; img2img and inpainting draw shared posterior samples and take one seed).
    `decode=False` returns the sampler's x itself (VE coordinates at the plan's last sigma), for a model that continues from it (SDXL's refiner).
    """
    s = settings
    if seeds is not None and len(seeds) != len(prompts) * s.n:
        raise LdmError(f"{len(seeds)} seeds for {len(prompts) * s.n} images; give one seed per image")
    generator = ImageGenerators(seeds) if seeds is not None else seeded_generator(s.seed)
    plan = sampling_plan(stage.schedule_config, s.sampler, s.steps, s.sigmas)
    if cond is None:
        cond = stage.conditioning(prompts, negative_prompts, s.n, s.guidance, s.clip_skip)
    base = plan.with_network_timesteps(stage.denoiser)  # the timesteps diffusers' / k-diffusion's network sees
    denoiser = cfg(base, s.guidance, rescale=s.guidance_rescale) if s.guidance > 1.0 else base
    shape = stage.shape(len(prompts) * s.n, s.height, s.width)
    cond = stage.micro_conditioning(cond, shape, s.micro_conditioning)  # SDXL's sizes, crop, aesthetic score
    start = (strategy or TextToImage()).start(stage, shape, plan, cond, denoiser, generator)
    denoiser = start.denoiser
    for wrap in (*stage.thresholding(s.dynamic_threshold, s.sampler), *wrappers):  # dynamic thresholding: pixel models
        denoiser = wrap(denoiser)
    x = run_sampler(s.sampler, denoiser, start.x, start.plan, start.cond, options=s.options(), generator=generator,
                    callback=callback, progress=progress)
    if not decode:
        return x
    return stage.codec.decode((x * start.plan.final_scale).to(stage.dtype))

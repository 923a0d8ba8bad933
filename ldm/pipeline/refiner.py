"""SDXL's ensemble of expert denoisers (Podell et al. 2023, sec. 2.5; Balaji et al. 2022): the base model runs the
high-noise steps, the refiner the low-noise rest, on one schedule and one latent.

diffusers' semantics: the base runs the timesteps t >= round(T - high_noise_frac * T) (`denoising_end`), the refiner
continues from its latent at the next one (`denoising_start`), with no new noise. Each model encodes the prompt with
its own text encoders and micro-conditioning (the refiner: its aesthetic score).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from PIL import Image

from ldm.diffusion.plans import SamplingPlan, sampling_plan
from ldm.errors import LdmError
from ldm.pipeline.images import to_pil
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.sampling import sample
from ldm.pipeline.settings import GenerationSettings
from ldm.pipeline.strategies import Start, TextToImage

HIGH_NOISE_FRAC = 0.8  # diffusers' documented split of the SDXL base + refiner ensemble


def split_step(plan: SamplingPlan, high_noise_frac: float, num_train_timesteps: int = 1000) -> int:
    """How many of the plan's steps the base model runs: those at timesteps >= round(T - frac T) (denoising_end)."""
    cutoff = int(round(num_train_timesteps - high_noise_frac * num_train_timesteps))
    return int((plan.timesteps >= cutoff).sum())


def first_steps(plan: SamplingPlan, steps: int) -> SamplingPlan:
    """The plan's first `steps` steps: it ends at sigmas[steps], where the next model takes over."""
    kwargs = {k: v[:steps] for k, v in plan.sampler_kwargs.items()}
    return replace(plan, sigmas=plan.sigmas[:steps + 1], timesteps=plan.timesteps[:steps], sampler_kwargs=kwargs)


@dataclass
class HighNoise:
    """Start from noise, run only the plan's first `steps` steps (the base model's share)."""

    steps: int

    def start(self, stage, shape, plan, cond, denoiser, generator) -> Start:
        start = TextToImage().start(stage, shape, plan, cond, denoiser, generator)
        return replace(start, plan=first_steps(plan, self.steps))


@dataclass
class LowNoise:
    """Continue from `x` (VE coordinates at the plan's sigma number `steps`): the refiner's share, no new noise."""

    x: torch.Tensor
    steps: int

    def start(self, stage, shape, plan, cond, denoiser, generator) -> Start:
        return Start(self.x.to(stage.device, stage.sample_dtype), plan.skip(self.steps), cond, denoiser)


class ExpertEnsemble:
    """Base + refiner as one text-to-image model: `ensemble(prompt, seed=...) -> list[PIL.Image]`."""

    def __init__(self, base: Pipeline, refiner: Pipeline, high_noise_frac: float = HIGH_NOISE_FRAC):
        if not 0.0 < high_noise_frac < 1.0:
            raise LdmError(f"--high-noise-frac must lie in (0, 1), got {high_noise_frac}")
        if refiner.stage.schedule_config != base.stage.schedule_config:
            raise LdmError(f"the refiner {refiner.model_name} has another noise schedule than the base model "
                           f"{base.model_name}; an ensemble continues one schedule")
        if refiner.factor != base.factor or refiner.codec.latent_channels != base.codec.latent_channels:
            raise LdmError(f"the refiner {refiner.model_name} works in another latent space than {base.model_name}")
        self.base, self.refiner, self.high_noise_frac = base, refiner, high_noise_frac

    stage = property(lambda self: self.base.stage)
    stages = property(lambda self: self.base.stages)  # the settings it is called with are the base's
    all_stages = property(lambda self: (*self.base.stages, *self.refiner.stages))  # what a call runs (fast path, FP8)
    unet = property(lambda self: self.base.unet)
    autoencoder = property(lambda self: self.refiner.autoencoder)  # the refiner decodes
    device = property(lambda self: self.base.device)
    dtype = property(lambda self: self.base.dtype)
    factor = property(lambda self: self.base.factor)
    default_size = property(lambda self: self.base.default_size)

    @property
    def model_name(self) -> str:
        return f"{self.base.model_name} + refiner {self.refiner.model_name}"

    def settings(self, *, from_image: bool = False, inpainting: bool = False, **settings) -> GenerationSettings:
        """Checked settings; the split must leave both models at least one step."""
        if from_image:
            raise LdmError("--refiner runs text-to-image; to refine a finished image give the refiner as --model with "
                           "--init-image and --strength")
        s = self.base.settings(**settings)
        self.refiner.stage.check_clip_skip(s.clip_skip)  # the refiner's bigG reads the prompt at the same layer
        plan = sampling_plan(self.base.schedule_config, s.sampler, s.steps, s.sigmas)
        k = split_step(plan, self.high_noise_frac, self.base.schedule_config.num_train_timesteps)
        if not 0 < k < s.steps:
            raise LdmError(f"--high-noise-frac {self.high_noise_frac} with --steps {s.steps} gives the base "
                           f"{k} of {s.steps} steps; each model needs one: change either")
        return s

    @torch.no_grad()
    def __call__(self, prompt: str, negative_prompt: str | None = None, *, progress: bool = False,
                 callback: Callable | None = None, **settings) -> list[Image.Image]:
        """Generate `n` images: the base model's high-noise steps, then the refiner's."""
        s = self.settings(**settings)
        plan = sampling_plan(self.base.schedule_config, s.sampler, s.steps, s.sigmas)
        k = split_step(plan, self.high_noise_frac, self.base.schedule_config.num_train_timesteps)
        x = sample(self.base.stage, [prompt], s, negative_prompts=[negative_prompt], strategy=HighNoise(k),
                   callback=callback, progress=progress, decode=False)
        images = sample(self.refiner.stage, [prompt], s, negative_prompts=[negative_prompt], strategy=LowNoise(x, k),
                        callback=callback, progress=progress)
        return to_pil(images)

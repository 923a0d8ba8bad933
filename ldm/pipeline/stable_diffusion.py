"""Latent text-to-image: prompt -> conditioning -> sampler over the denoiser -> autoencoder decode."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from ldm.diffusion.denoiser import build_denoiser
from ldm.diffusion.guidance import cfg
from ldm.diffusion.plans import sampling_plan
from ldm.diffusion.sampler_registry import check_sampler_options, run_sampler
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import LdmError
from ldm.pipeline.images import from_pil, mask_from_pil, to_pil


@dataclass
class GenerationSettings:
    """What a user picks per call; defaults follow diffusers' StableDiffusionPipeline."""

    sampler: str = "dpmpp_2m"
    steps: int = 30
    guidance: float = 7.5
    guidance_rescale: float = 0.0
    seed: int = 0
    n: int = 1  # images per prompt
    height: int | None = None
    width: int | None = None
    sampler_options: dict = field(default_factory=dict)  # e.g. {"eta": 0.5}: see ldm.diffusion.sampler_registry


def check_settings(s: GenerationSettings, factor: int) -> None:
    """Reject bad settings with a message that says what to change."""
    check_sampler_options(s.sampler, s.sampler_options)  # an unknown sampler or option names the choices
    if s.steps <= 0:
        raise LdmError(f"--steps must be a positive number of sampling steps, got {s.steps}")
    for name, value in (("guidance", s.guidance), ("guidance-rescale", s.guidance_rescale)):
        if not math.isfinite(value):  # NaN passes every comparison below and would fail deep inside the sampler
            raise LdmError(f"--{name} must be a finite number, got {value}")
    if not 0.0 <= s.guidance_rescale <= 1.0:
        raise LdmError(f"--guidance-rescale must lie in [0, 1], got {s.guidance_rescale}")
    if s.n <= 0:
        raise LdmError(f"--n must be positive, got {s.n}")
    for name, value in (("height", s.height), ("width", s.width)):
        if value is not None and (value <= 0 or value % factor):
            raise LdmError(f"--{name} {value} is not a positive multiple of the model's factor {factor}; "
                           f"try {max(factor, round(value / factor) * factor)}")


class _ConcatNetwork(torch.nn.Module):
    """Feeds extra channels (inpainting mask + masked-image latents) beside the scaled latent, as diffusers does."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, concat=None, **kwargs):
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        return self.unet(x, t, **kwargs)


def _blend_known(denoiser: Callable, known_x0: torch.Tensor, keep: torch.Tensor) -> Callable:
    """Inpainting by masked blending for ordinary checkpoints: outside the mask the denoiser returns the known latent."""

    def blended(x, sigma, cond):
        x0 = denoiser(x, sigma, cond)
        return keep * known_x0 + (1 - keep) * x0

    return blended


class StableDiffusion:
    """A latent diffusion model ready to sample: `pipe(prompt, seed=0) -> list[PIL.Image]`."""

    def __init__(self, components, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.components = components
        self.unet = components.unet.to(device=device, dtype=dtype).eval()
        self.autoencoder = components.autoencoder.to(device=device, dtype=dtype).eval()
        self.text_encoder = components.text_encoder.to(device=device).eval()
        self.schedule_config: ScheduleConfig = components.schedule
        self.device = torch.device(device)
        self.dtype = dtype
        self.network = _ConcatNetwork(self.unet)
        self.denoiser = build_denoiser(self.network, self.schedule_config)  # discrete (eps / v / x0) or EDM
        self.schedule = getattr(self.denoiser, "schedule", None)  # the DiscreteSchedule; None for an EDM model

    @property
    def factor(self) -> int:
        """Image sizes must be multiples of this: the autoencoder's factor times the U-Net's downsampling."""
        return self.autoencoder.downsample_factor * 2 ** (len(self.unet.config.channel_mult) - 1)

    @property
    def default_size(self) -> int:
        """Default image size: the U-Net's training latent size (diffusers' `sample_size`) times the autoencoder factor."""
        size = self.unet.config.sample_size or self.autoencoder.config.resolution // self.autoencoder.downsample_factor
        return int(size) * self.autoencoder.downsample_factor

    @property
    def model_name(self) -> str:
        return str(getattr(self.components, "source", "") or "")

    def encode_prompts(self, prompts: list[str]) -> dict:
        """Text -> the U-Net's cross-attention keyword arguments."""
        emb = self.text_encoder.encode(prompts)
        cond = {"context": emb.tokens.to(self.device, self.dtype)}
        if getattr(self.unet.config, "adm_in_channels", None) and emb.pooled is not None:
            cond["y"] = emb.pooled.to(self.device, self.dtype)
        if self.components.config.get("text_encoder", {}).get("type") == "t5":
            cond["context_mask"] = emb.mask.to(self.device)
        return cond

    def _conditioning(self, prompt: str, negative_prompt: str | None, n: int, guidance: float) -> dict:
        cond = self.encode_prompts([prompt])
        cond = {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}
        if guidance <= 1.0:
            return cond
        uncond = self.encode_prompts([negative_prompt or ""])
        uncond = {k: v.repeat_interleave(n, dim=0) for k, v in uncond.items()}
        return {"cond": cond, "uncond": uncond}

    def _latent_shape(self, s: GenerationSettings) -> tuple[int, int, int, int]:
        h = s.height or self.default_size
        w = s.width or self.default_size
        f = self.autoencoder.downsample_factor
        return (s.n, self.autoencoder.latent_channels, h // f, w // f)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        init_image: Image.Image | None = None,  # img2img / inpainting source
        strength: float | None = None,  # fraction of the noise schedule to run: default 0.8 img2img, 1.0 inpainting
        mask_image: Image.Image | None = None,  # inpainting: white = repaint
        wrappers: tuple = (),  # denoiser -> denoiser, applied after CFG: dynamic_threshold, classifier_guidance ...
        progress: bool = False,
        callback: Callable | None = None,
        **settings,
    ) -> list[Image.Image]:
        """Generate `n` images for one prompt (txt2img, img2img with `init_image`, inpainting with `mask_image`)."""
        s = GenerationSettings(**settings)
        check_settings(s, self.factor)
        if strength is None:  # diffusers' defaults: img2img 0.8, inpainting 1.0 (start from pure noise)
            strength = 1.0 if mask_image is not None else 0.8
        if init_image is not None and not 0.0 < strength <= 1.0:
            raise LdmError(f"strength must lie in (0, 1], got {strength}")
        if mask_image is not None and init_image is None:
            raise LdmError("inpainting needs an init image beside the mask")
        shape = self._latent_shape(s)
        plan = sampling_plan(self.schedule_config, s.sampler, s.steps)
        generator = torch.Generator("cpu").manual_seed(s.seed)
        # The initial noise is drawn exactly as diffusers draws it: one CPU randn of the latent shape.
        noise = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        cond = self._conditioning(prompt, negative_prompt, s.n, s.guidance)
        denoiser = cfg(self.denoiser, s.guidance, rescale=s.guidance_rescale) if s.guidance > 1.0 else self.denoiser
        x = noise * plan.init_noise_scale

        if init_image is not None:
            f = self.autoencoder.downsample_factor
            size = (shape[2] * f, shape[3] * f)
            pixels = from_pil(init_image, size).to(self.device, self.dtype)
            # The posterior mode: deterministic, and SD's posterior std is ~1e-3 of the latent scale anyway.
            known = self.autoencoder.encode_latents(pixels, sample=False).repeat(s.n, 1, 1, 1)
            in_channels = self.unet.config.in_channels
            if mask_image is not None:
                mask = mask_from_pil(mask_image, size).to(self.device, self.dtype)
                if in_channels == 2 * shape[1] + 1:  # a 9-channel inpainting checkpoint
                    masked = self.autoencoder.encode_latents(pixels * (mask < 0.5), sample=False).repeat(s.n, 1, 1, 1)
                    small = torch.nn.functional.interpolate(mask, size=shape[2:]).repeat(s.n, 1, 1, 1)
                    _add_concat(cond, torch.cat([small, masked], dim=1))
                else:
                    keep = 1 - torch.nn.functional.interpolate(mask, size=shape[2:])
                    denoiser = _blend_known(denoiser, known, keep)
            if mask_image is None or strength < 1.0:
                # img2img and partial inpainting (diffusers' rule): skip the first (1 - strength) of the steps and
                # noise the image to that sigma; inpainting at strength 1 starts from pure noise like txt2img.
                start = s.steps - min(int(s.steps * strength), s.steps)
                if start >= s.steps:
                    raise LdmError(f"strength {strength} with {s.steps} steps leaves no step to run; raise either")
                plan = plan.skip(start)
                x = known + plan.sigmas[0].to(self.device) * noise

        for wrap in wrappers:  # e.g. partial(dynamic_threshold, percentile=0.995) or classifier guidance
            denoiser = wrap(denoiser)
        x = run_sampler(s.sampler, denoiser, x, plan, cond, options=s.sampler_options, generator=generator,
                        callback=callback, progress=progress)
        latents = x * plan.final_scale
        return to_pil(self.autoencoder.decode_latents(latents.to(self.dtype)))


def _add_concat(cond: dict, concat: torch.Tensor) -> None:
    if "cond" in cond:
        cond["cond"]["concat"] = concat
        cond["uncond"]["concat"] = concat
    else:
        cond["concat"] = concat


"""A model ready to sample: its stages, and `pipe(prompt, seed=...) -> list[PIL.Image]`."""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image

from ldm.errors import LdmError
from ldm.io.components import ModelParts
from ldm.pipeline.fast import DEFAULT_MODE, compile_pipeline
from ldm.pipeline.images import from_pil, to_pil
from ldm.pipeline.latent_upscale import LatentUpscale
from ldm.pipeline.sampling import sample
from ldm.pipeline.settings import (IMG2IMG_STRENGTH, INPAINT_STRENGTH, GenerationSettings, check_batch_seeds,
                                   check_settings, with_defaults)
from ldm.pipeline.stage import Stage
from ldm.pipeline.strategies import strategy_for


class Pipeline:
    """Text-to-image (img2img and inpainting too) for whatever the model is: a latent or a pixel-space model.

    `stages` holds the model's one stage; several models run in turn are a `Cascade` (`ldm.pipeline.cascade`,
    `load_cascade`), whose stages are pipelines like this one. The usual parts are reachable as attributes: `unet`,
    `autoencoder` (None for a pixel model), `text_encoder`, `denoiser`, `schedule`.
    """

    def __init__(self, parts: ModelParts, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.components = parts
        self.stages = [Stage.from_parts(parts, device=device, dtype=dtype)]
        self.device, self.dtype = torch.device(device), dtype

    @property
    def stage(self) -> Stage:
        return self.stages[0]

    unet = property(lambda self: self.stage.unet)
    text_encoder = property(lambda self: self.stage.text_encoder)
    autoencoder = property(lambda self: getattr(self.stage.codec, "autoencoder", None))
    codec = property(lambda self: self.stage.codec)
    denoiser = property(lambda self: self.stage.denoiser)
    schedule_config = property(lambda self: self.stage.schedule_config)
    factor = property(lambda self: self.stage.factor)
    default_size = property(lambda self: self.stage.default_size)

    @property
    def schedule(self):
        """The DiscreteSchedule of a discrete model; None for an EDM model."""
        return getattr(self.denoiser, "schedule", None)

    @property
    def model_name(self) -> str:
        return str(getattr(self.components, "source", "") or "")

    def compile(self, mode: str | None = DEFAULT_MODE, **options) -> "Pipeline":
        """Turn the fast path on in place: fused q|k|v, NHWC, compiled networks (`ldm.pipeline.fast`)."""
        return compile_pipeline(self, mode=mode, **options)

    def encode_prompts(self, prompts: list[str], clip_skip: int | None = None) -> dict:
        """Text -> the U-Net's conditioning keyword arguments (`clip_skip` as diffusers')."""
        return self.stage.encode_prompts(prompts, clip_skip)

    def settings(self, *, from_image: bool = False, inpainting: bool = False, **settings) -> GenerationSettings:
        """Checked settings for a call (the one check the CLI, generate_to_folder and `pipe()` share)."""
        if self.stage.super_resolution:
            name, size = self.model_name or "SR", self.stage.stage_config.low_res_size
            raise LdmError(f"{name} is a super-resolution stage (it upscales {size} px images): run it after a base "
                           f"model that makes {size} px images with the same text encoder, --model BASE --upscaler "
                           f"{name}; to upscale an image of your own, add --init-image IMG --start-stage 2 to that "
                           "(the base does not run; in Python: load_cascade(BASE, [SR])(prompt, init_image=IMG, "
                           "start_stage=2))")
        settings = with_defaults(settings, self.stage.default_settings)
        if self.stage.latent_upscaler:
            return self._upscale_settings(from_image, inpainting, settings)
        s = GenerationSettings.from_call(settings)
        if from_image and s.strength is None:
            s.strength = INPAINT_STRENGTH if inpainting else self.stage.default_settings.get("strength", IMG2IMG_STRENGTH)
        check_settings(s, factor=self.factor, schedule_config=self.schedule_config,
                       conditional=self.stage.conditional, from_image=from_image)
        self.stage.check_clip_skip(s.clip_skip)
        return s

    def _upscale_settings(self, from_image: bool, inpainting: bool, settings: dict) -> GenerationSettings:
        """A latent upscaler alone upscales the --init-image it is given to its codec's factor times its size."""
        name = self.model_name or "this model"
        if not from_image:
            raise LdmError(f"{name} is a latent upscaler: give the image to upscale with --init-image (or use it as "
                           "--upscaler after a base model)")
        if inpainting or settings.get("strength") is not None:
            raise LdmError(f"{name} upscales its --init-image: --mask and --strength do not apply")
        if settings.get("height") is not None or settings.get("width") is not None:
            raise LdmError(f"{name} makes images {self.codec.downsample_factor}x the size of --init-image: leave out "
                           "--height and --width")
        s = GenerationSettings.from_call(settings)
        check_settings(s, factor=1, schedule_config=self.schedule_config, conditional=self.stage.conditional)
        self.stage.check_clip_skip(s.clip_skip)
        return s

    def check_inputs(self, init_image: Image.Image | None = None, **_) -> None:
        """A latent upscaler's input image must map to a latent its U-Net can halve (before any file is written)."""
        if init_image is not None and self.stage.latent_upscaler:
            unet_factor = self.factor // self.codec.downsample_factor
            if init_image.width % unet_factor or init_image.height % unet_factor:
                name = self.model_name or "the upscaler"
                raise LdmError(f"--init-image is {init_image.width}x{init_image.height}; {name} needs sides that "
                               f"are multiples of {unet_factor}: resize or crop it")

    def noise_level(self, override: int | None = None) -> int | None:
        """A latent upscaler's noise level: `override`, else its config's; None for other models."""
        if not self.stage.latent_upscaler:
            if override is not None:
                raise LdmError("--noise-level is the x4 upscaler's (a latent upscaler's); this model has none")
            return None
        return self.stage.latent_upscale.noise_level if override is None else override

    def _upscale(self, prompt, negative_prompt, image: Image.Image, s: GenerationSettings, noise_level, **kwargs):
        self.check_inputs(init_image=image)
        f = self.codec.downsample_factor
        s.height, s.width = image.height * f, image.width * f
        strategy = LatentUpscale(from_pil(image), self.noise_level(noise_level), self.stage.latent_upscale)
        return to_pil(sample(self.stage, [prompt], s, negative_prompts=[negative_prompt], strategy=strategy,
                             **kwargs))

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
        noise_level: int | None = None,  # a latent upscaler's (x4: default 20)
        **settings,
    ) -> list[Image.Image]:
        """Generate `n` images for one prompt (txt2img, img2img with `init_image`, inpainting with `mask_image`;
        a latent upscaler upscales `init_image`)."""
        if mask_image is not None and init_image is None:
            raise LdmError("inpainting needs an init image beside the mask")
        s = self.settings(from_image=init_image is not None, inpainting=mask_image is not None, strength=strength,
                          **settings)
        if self.stage.latent_upscaler:
            return self._upscale(prompt, negative_prompt, init_image, s, noise_level, wrappers=wrappers,
                                 callback=callback, progress=progress)
        self.noise_level(noise_level)  # refuses a noise level given to a model without one
        strategy = strategy_for(init_image, mask_image, s.strength)
        images = sample(self.stage, [prompt], s, negative_prompts=[negative_prompt], strategy=strategy,
                        wrappers=wrappers, callback=callback, progress=progress)
        return to_pil(images)

    @torch.no_grad()
    def batch(self, prompts: list[str], seeds: list[int], negative_prompt: str | None = None, *,
              progress: bool = False, **settings) -> list[Image.Image]:
        """One text-to-image image per (prompt, seed), all in one batch: image k is `self(prompts[k],
        seed=seeds[k])[0]`, whatever else shares its batch (per-image noise, `ldm.runtime.ImageGenerators`)."""
        check_batch_seeds(prompts, seeds)
        s = self.settings(**{**settings, "n": 1})
        images = sample(self.stage, list(prompts), s, negative_prompts=[negative_prompt] * len(prompts),
                        seeds=list(seeds), progress=progress)
        return to_pil(images)


StableDiffusion = Pipeline  # the former name

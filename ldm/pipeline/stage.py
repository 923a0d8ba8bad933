"""A stage: a denoiser (network + schedule), a codec, a conditioning builder and an output shape.

Text-to-image is one stage; a cascade (Imagen: 64 px base, then super-resolution stages) is several sharing one text
embedding. A stage knows nothing of where its initial x comes from: that is the start strategy's job
(`ldm.pipeline.strategies`).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ldm.config import from_dict
from ldm.diffusion.conditioning import ConcatNetwork, drop_full_masks, takes_pooled_text, text_conditioning
from ldm.diffusion.denoiser import build_denoiser
from ldm.diffusion.guidance import dynamic_threshold, static_threshold
from ldm.diffusion.latent_upscale import DEFAULT_GUIDANCE, DEFAULT_STEPS, SECTION, LatentUpscaleConfig
from ldm.diffusion.noise_augmentation import StageConfig
from ldm.diffusion.sampler_registry import get_sampler
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import LdmError
from ldm.io.components import ModelParts
from ldm.models.codecs import IdentityCodec
from ldm.pipeline.latent_upscale import Float32Codec
from ldm.pipeline.settings import SDXL_IMG2IMG_STRENGTH
from ldm.models.micro_conditioning import with_micro_conditioning


class Stage:
    """One denoising stage, on `device` in `dtype` (the text encoder keeps its own precision)."""

    def __init__(self, network: nn.Module, schedule_config: ScheduleConfig, codec: nn.Module,
                 text_encoder: nn.Module | None = None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, stage_config: StageConfig | None = None,
                 latent_upscale: LatentUpscaleConfig | None = None):
        self.device, self.dtype = torch.device(device), dtype
        # The sampler's x is at least float32 (float16 cannot hold sigma_max * noise, `Denoiser`); the network, its
        # conditioning and the codec run in `dtype`.
        self.sample_dtype = torch.promote_types(dtype, torch.float32)
        self.stage_config = stage_config  # a pixel cascade stage's sizes, augmentation level and thresholding
        self.latent_upscale = latent_upscale  # a latent SR stage's low-res noise schedule (the SD x4 upscaler)
        self.unet = network.to(device=device, dtype=dtype).eval()
        self.codec = codec.to(device=device, dtype=dtype).eval()
        # Autoencoders that overflow in float16 decode in float32: the x4 upscaler's (its x4-upscaling.yaml) and those
        # whose config says `force_upcast` (SDXL's), as diffusers does.
        upcast = getattr(getattr(codec, "autoencoder", None), "config", None)
        if dtype == torch.float16 and (latent_upscale is not None or getattr(upcast, "force_upcast", False)):
            self.codec = Float32Codec(self.codec)
        # The text encoder keeps its stored precision, except that an fp32 pipeline computes it in fp32 too: half
        # precision on the CPU is slow (no fast kernels) and buys nothing there.
        text_dtype = torch.float32 if dtype == torch.float32 else None
        self.text_encoder = (text_encoder.to(device=device, dtype=text_dtype).eval() if text_encoder is not None
                             else None)
        self.schedule_config = schedule_config
        self.network = ConcatNetwork(self.unet)  # extra input channels: inpainting masks, low-resolution images
        self.denoiser = build_denoiser(self.network, schedule_config, dtype)  # discrete (eps / v / x0) or EDM

    @classmethod
    def from_parts(cls, parts: ModelParts, *, device="cpu", dtype=torch.float32) -> "Stage":
        """The stage of a single-stage model: its U-Net, schedule, codec and text encoder."""
        section = parts.config.get("stage")
        stage_config = from_dict(StageConfig, section, where="stage") if section is not None else None
        upscale = parts.config.get(SECTION)
        upscale = from_dict(LatentUpscaleConfig, upscale, where=SECTION) if upscale is not None else None
        return cls(parts.unet, parts.schedule, parts.codec, parts.text_encoder, device=device, dtype=dtype,
                   stage_config=stage_config, latent_upscale=upscale)

    @property
    def pixel(self) -> bool:
        """Whether the stage denoises pixels (no autoencoder)."""
        return isinstance(self.codec, IdentityCodec)

    @property
    def super_resolution(self) -> bool:
        """Whether the stage upscales a low-resolution image (its config names `low_res_size`)."""
        return self.stage_config is not None and self.stage_config.low_res_size is not None

    @property
    def latent_upscaler(self) -> bool:
        """Whether the stage upscales an image by its codec's factor (the SD x4 upscaler: any input size)."""
        return self.latent_upscale is not None

    @property
    def default_settings(self) -> dict:
        """Steps, guidance and sampler this stage samples with unless told otherwise: its config's `stage` section
        (DeepFloyd IF: 100 / 50 steps, guidance 7 / 4, ddpm), the x4 upscaler's 75 steps at guidance 9; and an SDXL
        model's img2img `strength` (0.3, as diffusers' SDXL img2img)."""
        if self.latent_upscaler:
            return {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}
        own = {name: getattr(self.stage_config, name, None) for name in ("steps", "guidance", "sampler")}
        if getattr(self.unet.config, "micro_conditioning", ()):  # SDXL: diffusers' img2img default strength
            own["strength"] = SDXL_IMG2IMG_STRENGTH
        return {name: value for name, value in own.items() if value is not None}

    def threshold_percentile(self, percentile: float | None = None) -> float | None:
        """Dynamic thresholding's percentile: on for pixel models at the stage config's (0.995 without one), off for
        latent models (their x0 is not an image in [-1, 1]). `percentile` overrides it; 0 turns it off."""
        if percentile is None:
            percentile = (self.stage_config or StageConfig()).dynamic_threshold if self.pixel else None
        return percentile or None

    def thresholding(self, percentile: float | None = None, sampler: str | None = None) -> tuple:
        """The denoiser wrappers of x0's thresholding (Saharia et al. 2022, Sec. 2.3): dynamic at the percentile;
        without it, for a pixel model, static clipping where the schedule says `clip_sample` and `sampler`'s diffusers
        scheduler reads that key (DDPM, DDIM and Heun do; DPM-Solver, UniPC and Euler do not: `clip_limit`); otherwise
        none. A latent model's x0 is never clipped, whatever its scheduler config says (diffusers'
        StableDiffusionPipeline forces clip_sample off too)."""
        resolved = self.threshold_percentile(percentile)
        if resolved:
            cap = self.threshold_cap(percentile) or float("inf")
            return (partial(dynamic_threshold, percentile=resolved, max_value=cap),)
        limit = self.clip_limit(percentile, sampler)  # the caller's percentile: 0 (off) must not fall back
        return (partial(static_threshold, limit=limit),) if limit is not None else ()

    def threshold_cap(self, percentile: float | None = None) -> float | None:
        """The cap on dynamic thresholding's s (`stage.dynamic_threshold_max`, DeepFloyd IF's `sample_max_value`)
        where it runs at `percentile` (`threshold_percentile`), also when the config's own thresholding is off and the
        caller turns it on; None where it does not run or has no cap (recorded in the images' metadata)."""
        if not self.threshold_percentile(percentile):
            return None
        return (self.stage_config or StageConfig()).dynamic_threshold_max

    def clip_limit(self, percentile: float | None = None, sampler: str | None = None) -> float | None:
        """x0's static clip (`clip_sample_range`) where `thresholding` clips instead of thresholding dynamically: a
        pixel stage whose schedule says `clip_sample`, sampled by a sampler whose diffusers scheduler reads the key
        (`SamplerSpec.config_keys`; None: any sampler); None otherwise (recorded in the images' metadata)."""
        if self.threshold_percentile(percentile) or not (self.pixel and self.schedule_config.clip_sample):
            return None
        if sampler is not None and "clip_sample" not in get_sampler(sampler).config_keys:
            return None  # diffusers' DPMSolverMultistepScheduler, UniPC, Euler, ... never clip x0
        return self.schedule_config.clip_sample_range

    @property
    def conditional(self) -> bool:
        """Whether the stage takes text."""
        return self.text_encoder is not None

    @property
    def factor(self) -> int:
        """Image sizes must be multiples of this: the codec's factor times the U-Net's downsampling."""
        own = getattr(self.unet.config, "downsample_factor", None)  # the Efficient U-Net's (SR stages: one more)
        return self.codec.downsample_factor * (own or 2 ** (len(self.unet.config.channel_mult) - 1))

    @property
    def default_size(self) -> int:
        """The U-Net's training size in its own space (diffusers' `sample_size`) times the codec's factor."""
        size = getattr(self.unet.config, "sample_size", None)
        if size is None and hasattr(self.codec, "autoencoder"):
            size = self.codec.autoencoder.config.resolution // self.codec.downsample_factor
        return int(size or 64) * self.codec.downsample_factor

    def shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        """`b c h w` of the denoiser's x for images of `height` x `width` (None: the default size)."""
        f = self.codec.downsample_factor
        return (batch, self.codec.latent_channels, (height or self.default_size) // f, (width or self.default_size) // f)

    def check_clip_skip(self, clip_skip: int | None) -> None:
        """Refuse a clip_skip this stage's text encoder cannot take (or any, without a text encoder)."""
        if clip_skip is None:
            return
        if self.text_encoder is None:
            raise LdmError(f"--clip-skip {clip_skip}: this model has no text encoder; leave --clip-skip out")
        self.text_encoder.check_clip_skip(clip_skip)

    def encode_prompts(self, prompts: list[str], clip_skip: int | None = None) -> dict:
        """Text -> the network's conditioning arguments (context, its mask, pooled `y` where the U-Net takes it);
        `clip_skip` as diffusers' (None: the text encoder's own layer)."""
        if self.text_encoder is None:
            return {}
        pooled = takes_pooled_text(self.unet.config)
        cond = text_conditioning(self.text_encoder.encode(list(prompts), clip_skip=clip_skip), pooled=pooled)
        return {k: v.to(self.device, v.dtype if k == "context_mask" else self.dtype) for k, v in cond.items()}

    def conditioning(self, prompts: list[str], negative_prompts: list[str | None] | None, repeat: int,
                     guidance: float, clip_skip: int | None = None) -> dict:
        """Conditioning for `prompts`, each repeated `repeat` times; `{"cond", "uncond"}` under guidance > 1; an
        all-True text mask (CLIP's) is dropped (`drop_full_masks`).

        `clip_skip` reads the prompts and the negative prompts at the same layer (A1111 and ComfyUI do too; diffusers'
        pipelines read the negative prompt at the model's own layer whatever clip_skip: docs/clip-skip.md)."""
        for text in [*prompts, *(n for n in negative_prompts or () if n is not None)]:
            if not isinstance(text, str):  # a list would be tokenized as one prompt and give one image, silently
                raise LdmError(f"a prompt is a string, got {type(text).__name__} {text!r:.60}; for several prompts "
                               "use pipe.batch(prompts, seeds) or generate_to_folder(pipe, prompts, folder)")
        cond = _repeat(self.encode_prompts(prompts, clip_skip), repeat)
        if guidance <= 1.0:
            return drop_full_masks(cond)
        given = list(negative_prompts or [None] * len(prompts))
        uncond = self.encode_prompts([n or "" for n in given], clip_skip)
        if getattr(self.text_encoder, "force_zeros_for_empty_prompt", False):  # SDXL: no negative prompt -> zeros
            keep = torch.tensor([n is not None for n in given], device=self.device)
            uncond = {k: v * keep.view(-1, *[1] * (v.ndim - 1)).to(v.dtype) if k in ("context", "y") else v
                      for k, v in uncond.items()}
        return drop_full_masks({"cond": cond, "uncond": _repeat(uncond, repeat)})

    def micro_conditioning(self, cond: dict, shape: tuple[int, ...], given: dict | None = None) -> dict:
        """`cond` with SDXL's micro-conditioning numbers for images of `shape` (`b c h w` in denoiser space); `given`
        overrides diffusers' defaults. Unchanged for a U-Net without micro-conditioning."""
        names = getattr(self.unet.config, "micro_conditioning", ())
        f = self.codec.downsample_factor
        return with_micro_conditioning(cond, names, shape[2] * f, shape[3] * f, given)


def _repeat(cond: dict, n: int) -> dict:
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}

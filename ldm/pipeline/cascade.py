"""A cascade: a base stage, then super-resolution stages, sharing one text embedding (Imagen, DeepFloyd IF).

`load_cascade(base, [sr, ...])(prompt, seed=0)` -> the last stage's images. Each stage samples through the one
sampling function (`ldm.pipeline.sampling.sample`) with the `SuperResolution` start strategy after the first. The
images pass between stages as 8-bit images, exactly what a saved PNG holds, so upscaling a saved stage-1 image with
`start_stage=2` gives the same final image as the whole cascade. Stage k >= 2 samples with its own seed derived from
(seed, k), so a stage's randomness does not depend on where the cascade started.

A latent upscaler (the SD x4 upscaler, `ldm.pipeline.latent_upscale`) is a stage too: it takes the previous stage's
pixels as its low-resolution conditioning at its `noise_level`, makes images its codec's factor larger, and brings
its own text encoder, whose embedding it computes for itself.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
from PIL import Image

from ldm.config import to_plain
from ldm.diffusion.latent_upscale import check_noise_level
from ldm.diffusion.noise_augmentation import SAMPLING_DEFAULTS, level_from_if_noise_level
from ldm.errors import LdmError
from ldm.pipeline.default_model import DEFAULT, default_upscaler_path
from ldm.pipeline.images import from_pil, to_pil
from ldm.pipeline.latent_upscale import LatentUpscale
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.sampling import sample
from ldm.pipeline.settings import GenerationSettings, check_batch_seeds, check_settings, with_defaults
from ldm.pipeline.super_resolution import SuperResolution, check_start_strength, check_steps_left
from ldm.runtime import derive_seed

IF_TIMESTEPS = 1000  # IF's noise_level is a timestep of its 1000-step cosine schedule

PER_STAGE = ("steps", "guidance", "sampler")  # the settings a cascade takes one per stage (--stage-steps 50,25)


class Cascade:
    """Pipelines run in turn: `pipelines[0]` makes the image, each later one (a super-resolution stage) upscales it.

    Defaults for a call: `stage_steps` / `stage_guidance` / `stage_sampler` (one entry per stage, None = the call's
    common setting, then the stage's own defaults), `aug_level` and `upscale_strength` (the SR stages' level and
    start strength; None = each SR stage's config), `noise_level` (a latent upscaler's; None = its config's),
    `start_stage` (1-based) and `dynamic_threshold` (None = each stage's default: on for pixel stages at their
    config's percentile).
    """

    def __init__(self, pipelines: list[Pipeline], *, stage_steps=None, stage_guidance=None, stage_sampler=None,
                 aug_level: float | None = None, start_stage: int = 1, dynamic_threshold: float | None = None,
                 noise_level: int | None = None, upscale_strength: float | None = None):
        self.pipelines = list(pipelines)
        self.stages = [p.stage for p in self.pipelines]
        self.text_groups = check_cascade(self.pipelines)  # stages with equal text encoders share one embedding
        self.options = dict(stage_steps=stage_steps, stage_guidance=stage_guidance, stage_sampler=stage_sampler,
                            aug_level=aug_level, start_stage=start_stage, dynamic_threshold=dynamic_threshold,
                            noise_level=noise_level, upscale_strength=upscale_strength)
        self.check_options(**self.options)

    # What generate_to_folder reads of a pipeline: the last stage is the largest, so memory is estimated on it.
    unet = property(lambda self: self.stages[-1].unet)
    autoencoder = property(lambda self: getattr(self.stages[-1].codec, "autoencoder", None))
    device = property(lambda self: self.stages[-1].device)
    dtype = property(lambda self: self.stages[-1].dtype)

    @property
    def default_size(self) -> int:
        return self.output_sizes()[-1]

    @property
    def model_name(self) -> str:
        return " -> ".join(p.model_name for p in self.pipelines)

    def output_sizes(self) -> list[int]:
        """Each stage's output size in pixels: the base's default size, then each SR stage's resolution (a latent
        upscaler's: its input times its codec's factor)."""
        return _output_sizes(self.stages)

    def check_options(self, *, stage_steps=None, stage_guidance=None, stage_sampler=None, aug_level=None,
                      start_stage: int = 1, dynamic_threshold=None, noise_level=None, upscale_strength=None) -> None:
        """Refuse per-stage lists of the wrong length, a level outside [0, 1], a start strength outside (0, 1] or
        without a pixel SR stage, and a start stage that does not exist."""
        n = len(self.stages)
        for name, values in (("steps", stage_steps), ("guidance", stage_guidance), ("sampler", stage_sampler)):
            if values is not None and len(values) != n:
                raise LdmError(f"--stage-{name} gives {len(values)} value(s) for a cascade of {n} stages; give one "
                               "per stage, comma-separated")
        if aug_level is not None and not (isinstance(aug_level, (int, float)) and 0.0 <= aug_level <= 1.0):
            raise LdmError(f"--aug-level must lie in [0, 1] (0 = the exact low-res image, 1 = pure noise), "
                           f"got {aug_level}")
        if upscale_strength is not None:
            check_start_strength(upscale_strength)
            if not any(s.super_resolution for s in self.stages[1:]):
                raise LdmError("--upscale-strength is a pixel super-resolution stage's; this cascade has none (a "
                               "latent upscaler's input noise is --noise-level)")
        if not isinstance(start_stage, int) or not 1 <= start_stage <= n:
            raise LdmError(f"--start-stage {start_stage}: this cascade has stages 1..{n}")
        if noise_level is not None:
            upscalers = [s for s in self.stages if s.latent_upscaler]
            if not upscalers:
                hint = ""
                if any(s.super_resolution for s in self.stages[1:]):  # IF-II's own argument is noise_level
                    level = (f" (IF's noise_level {noise_level} is --aug-level "
                             f"{float(level_from_if_noise_level(noise_level)):.8f})"
                             if isinstance(noise_level, int) and 0 <= noise_level < IF_TIMESTEPS else "")
                    hint = (f"; a pixel super-resolution stage (DeepFloyd IF-II, Imagen) takes --aug-level, a level "
                            f"in [0, 1]{level}")
                raise LdmError(f"--noise-level is a latent upscaler's (the x4 upscaler's); this cascade has none{hint}")
            for stage in upscalers:
                check_noise_level(noise_level, stage.latent_upscale.max_noise_level)

    def stage_settings(self, settings: GenerationSettings, *, stage_steps=None, stage_guidance=None,
                       stage_sampler=None, **_) -> list[GenerationSettings]:
        """Each stage's settings: the per-stage lists, over the call's common ones, over the stage's own defaults
        (steps and guidance left None), and the stage's own size."""
        out = []
        for i, (stage, size) in enumerate(zip(self.stages, self.output_sizes())):
            common = GenerationSettings(**with_defaults({"steps": settings.steps, "guidance": settings.guidance},
                                                        stage.default_settings))
            chosen = {"steps": common.steps, "guidance": common.guidance}
            chosen.update({name: values[i] for name, values in (("steps", stage_steps), ("guidance", stage_guidance),
                                                                 ("sampler", stage_sampler))
                           if values is not None and values[i] is not None})
            s = dataclasses.replace(settings, height=size, width=size, strength=None, **chosen)
            if not stage.pixel and settings.dynamic_threshold is not None:
                s.dynamic_threshold = 0.0  # the one percentile is for the pixel stages; a latent base keeps it off
            out.append(s)
        return out

    def settings(self, *, from_image: bool = False, inpainting: bool = False, strength=None, options: dict | None = None,
                 **settings) -> GenerationSettings:
        """The call's common settings, checked for every stage (the check generate_to_folder runs first)."""
        options = options or self.options
        if inpainting or strength is not None:
            raise LdmError("a cascade upscales: --mask and --strength do not apply (use --init-image with "
                           "--start-stage to upscale an image)")
        if settings.get("height") is not None or settings.get("width") is not None:
            raise LdmError(f"a cascade's sizes come from its stages ({' -> '.join(map(str, self.output_sizes()))} "
                           "px): leave out --height and --width")
        common = GenerationSettings.from_call(settings)
        if from_image and options["start_stage"] == 1:
            raise LdmError("--init-image with a cascade upscales that image: give --start-stage 2 (or later)")
        if not from_image and options["start_stage"] > 1:
            raise LdmError(f"--start-stage {options['start_stage']} upscales an image: give it with --init-image")
        for i, (stage, s) in enumerate(zip(self.stages, self.stage_settings(common, **options))):
            check_settings(s, factor=1, schedule_config=stage.schedule_config, conditional=stage.conditional)
            if common.clip_skip is not None and stage.text_encoder is not None:  # every stage with text reads it
                stage.check_clip_skip(common.clip_skip)
            if stage.super_resolution:
                check_steps_left(self.start_strength(i, options["upscale_strength"]), s.steps, f"stage {i + 1}")
        return common

    def records(self, settings: GenerationSettings, **options) -> list[dict]:
        """What each stage ran with, for the PNG metadata and metadata.jsonl."""
        options = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        rows = []
        for i, (pipe, s) in enumerate(zip(self.pipelines, self.stage_settings(settings, **options))):
            row = {"stage": i + 1, "model": pipe.model_name, "sampler": s.sampler, "steps": s.steps,
                   "guidance": s.guidance, "seed": self.stage_seed(settings.seed, i), "size": s.height,
                   "dynamic_threshold": pipe.stage.threshold_percentile(s.dynamic_threshold),
                   "sigmas": s.sigmas, "ran": i + 1 >= options["start_stage"]}
            if (cap := pipe.stage.threshold_cap(s.dynamic_threshold)) is not None:
                row["dynamic_threshold_max"] = cap  # the cap on s (IF's sample_max_value)
            if (limit := pipe.stage.clip_limit(s.dynamic_threshold, s.sampler)) is not None:
                row["clip_sample"] = limit  # x0 clipped to [-limit, limit] instead of dynamic thresholding
            if pipe.stage.latent_upscaler:
                row["noise_level"] = self.noise_level(i, options["noise_level"])
                row["text_encoder"] = "own" if self.text_groups[i] == i else f"stage {self.text_groups[i] + 1}'s"
            elif i > 0:
                row["aug_level"] = self.aug_level(i, options["aug_level"])
                row["start_strength"] = self.start_strength(i, options["upscale_strength"])
            rows.append(row)
        return rows

    @staticmethod
    def stage_seed(seed: int, index: int) -> int:
        """Stage 1 uses the seed itself (so it equals the base model alone); stage k a seed derived from (seed, k)."""
        return seed if index == 0 else derive_seed(seed, "cascade-stage", index + 1)

    def aug_level(self, index: int, override: float | None) -> float:
        return float(override if override is not None else self.stages[index].stage_config.aug_level)

    def start_strength(self, index: int, override: float | None) -> float:
        return float(override if override is not None else self.stages[index].stage_config.start_strength)

    def noise_level(self, index: int, override: int | None) -> int:
        return int(override if override is not None else self.stages[index].latent_upscale.noise_level)

    def _strategy(self, index: int, low_res: torch.Tensor, options: dict):
        stage = self.stages[index]
        if stage.latent_upscaler:
            return LatentUpscale(low_res, self.noise_level(index, options["noise_level"]), stage.latent_upscale)
        return SuperResolution(low_res, self.aug_level(index, options["aug_level"]), stage.stage_config.resize_mode,
                               self.start_strength(index, options["upscale_strength"]))

    @torch.no_grad()
    def __call__(self, prompt: str, negative_prompt: str | None = None, *, seed: int = 0,
                 init_image: Image.Image | None = None, return_all_stages: bool = False,
                 progress: bool = False, callback: Callable | None = None, stage_steps=None, stage_guidance=None,
                 stage_sampler=None, aug_level=None, start_stage=None, noise_level=None, upscale_strength=None,
                 strength=None, **settings):
        """The last stage's `n` images for `prompt` (with `return_all_stages`, a list of every run stage's images).

        `init_image` with `start_stage` k >= 2 upscales that image with stages k, k+1, ... `upscale_strength` in
        (0, 1] starts the SR stages part-way down their schedules (`strength` is img2img's, refused here).
        """
        overrides = dict(stage_steps=stage_steps, stage_guidance=stage_guidance, stage_sampler=stage_sampler,
                         aug_level=aug_level, start_stage=start_stage, noise_level=noise_level,
                         upscale_strength=upscale_strength)
        options = {**self.options, **{k: v for k, v in overrides.items() if v is not None}}
        options, settings = self._own_defaults(options, settings)
        self.check_options(**options)
        common = self.settings(from_image=init_image is not None, strength=strength, seed=seed, options=options,
                               **settings)
        low_res = None if init_image is None else self._input_image(init_image, options["start_stage"] - 1)
        all_images = self._run([prompt], [negative_prompt], common, options, low_res=low_res, callback=callback,
                               progress=progress)
        return all_images if return_all_stages else all_images[-1]

    @torch.no_grad()
    def batch(self, prompts: list[str], seeds: list[int], negative_prompt: str | None = None, *,
              aug_level: float | None = None, upscale_strength: float | None = None, progress: bool = False,
              **settings) -> list[Image.Image]:
        """One final image per (prompt, seed), the whole batch through every stage: image k is
        `self(prompts[k], seed=seeds[k])[0]`, whatever else shares its batch (per-image noise at every stage)."""
        check_batch_seeds(prompts, seeds)
        overrides = dict(aug_level=aug_level, upscale_strength=upscale_strength)
        options = {**self.options, **{k: v for k, v in overrides.items() if v is not None}}
        options, settings = self._own_defaults(options, settings)
        self.check_options(**options)
        common = self.settings(options=options, **{**settings, "n": 1})
        return self._run(list(prompts), [negative_prompt] * len(prompts), common, options, seeds=list(seeds),
                         progress=progress)[-1]

    def _own_defaults(self, options: dict, settings: dict) -> tuple[dict, dict]:
        """Each stage's own steps / guidance / sampler (`Stage.default_settings`: the bundled upscaler's 8 steps at
        guidance 1, IF's 100 / 50 steps) where the call gives neither the common value nor a per-stage list, as
        `ldm-txt2img` does; stages without their own take GenerationSettings' defaults."""
        options, settings = dict(options), dict(settings)
        for name in SAMPLING_DEFAULTS:
            if settings.get(name) is not None or options[f"stage_{name}"] is not None:
                continue
            settings.pop(name, None)
            own = [s.default_settings.get(name) for s in self.stages]
            if any(v is not None for v in own):
                options[f"stage_{name}"] = own
        return options, settings

    def _run(self, prompts, negatives, common: GenerationSettings, options: dict, *, seeds=None, low_res=None,
             callback=None, progress=False) -> list[list[Image.Image]]:
        """Every run stage's images: `common.n` per prompt from `common.seed`, or one per prompt from `seeds`."""
        first = options["start_stage"] - 1
        per_stage = self.stage_settings(common, **options)
        # The text embedding, computed once per text encoder (by the first stage that runs with it) and shared by
        # every stage of its group; a latent upscaler with its own encoder is a group of its own.
        groups = {}
        for i in range(first, len(self.stages)):
            if self.text_groups[i] not in groups:
                group = [j for j in range(first, len(self.stages)) if self.text_groups[j] == self.text_groups[i]]
                guided = any(per_stage[j].guidance > 1.0 for j in group)
                groups[self.text_groups[i]] = (guided, self.stages[i].conditioning(
                    prompts, negatives, common.n, 2.0 if guided else 1.0, common.clip_skip))
        all_images = []
        for i in range(first, len(self.stages)):
            stage, s = self.stages[i], dataclasses.replace(per_stage[i], seed=self.stage_seed(common.seed, i))
            guided, shared = groups[self.text_groups[i]]
            cond = shared if s.guidance > 1.0 or not guided else shared["cond"]
            strategy = self._strategy(i, low_res, options) if i > 0 else None
            stage_seeds = None if seeds is None else [self.stage_seed(seed, i) for seed in seeds]
            images = to_pil(sample(stage, prompts, s, cond=cond, strategy=strategy, seeds=stage_seeds,
                                   callback=callback, progress=progress))
            all_images.append(images)
            low_res = from_pil(images)  # 8-bit between stages: a saved PNG upscales to the same image
        return all_images

    def check_inputs(self, init_image: Image.Image | None = None, **_) -> None:
        """Refuse an image to upscale whose size is not the start stage's input size (before any file is written)."""
        if init_image is not None:
            self._input_image(init_image, self.options["start_stage"] - 1)

    def _input_image(self, image: Image.Image, index: int) -> torch.Tensor:
        """The image given to stage `index + 1`: its size must be the one the stage upscales."""
        stage = self.stages[index]
        size = self.output_sizes()[index - 1] if stage.latent_upscaler else stage.stage_config.low_res_size
        if image.size != (size, size):
            raise LdmError(f"--init-image is {image.size[0]}x{image.size[1]}, but stage {index + 1} upscales "
                           f"{size}x{size} images: resize it, or start at another stage")
        return from_pil(image)


def text_encoder_signature(pipe: Pipeline) -> tuple:
    """What must agree for stages to share one text embedding: the encoder's config and its weights."""
    encoder = pipe.stage.text_encoder
    if encoder is None:
        return (None,)
    config = {k: v for k, v in to_plain(pipe.components.config.get("text_encoder") or {}).items()
              if k not in ("pretrained", "freeze")}
    return (config, {k: v.detach().cpu() for k, v in encoder.state_dict().items()})


def _same_text_encoder(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] is None:
        return True
    wa, wb = a[1], b[1]
    return wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape and torch.equal(wa[k], wb[k]) for k in wa)


def _output_sizes(stages) -> list[int]:
    sizes = [stages[0].default_size]
    for stage in stages[1:]:
        sizes.append(sizes[-1] * stage.codec.downsample_factor if stage.latent_upscaler
                     else stage.stage_config.resolution)
    return sizes


def check_cascade(pipelines: list[Pipeline]) -> list[int]:
    """Refuse a cascade that cannot run: a super-resolution base, a latent or base model as an upscaler, sizes that
    do not chain, or pixel stages whose text encoders differ from the base's (the one text embedding is shared).

    A latent upscaler may bring its own text encoder (the x4 upscaler's OpenCLIP beside IF's T5). Returns, per stage,
    the index of the first stage with an equal text encoder: the stages that share its embedding.
    """
    if not pipelines:
        raise LdmError("a cascade needs a base model")
    base = pipelines[0]
    if base.stage.super_resolution or base.stage.latent_upscaler:
        raise LdmError(f"--model {base.model_name}: a super-resolution stage cannot be the base; give a base model "
                       "with --model and this one with --upscaler")
    size = base.stage.default_size
    signatures = [text_encoder_signature(base)]
    groups = [0]
    for k, pipe in enumerate(pipelines[1:], start=2):
        stage = pipe.stage
        signature = text_encoder_signature(pipe)
        groups.append(next((j for j, other in enumerate(signatures) if _same_text_encoder(other, signature)), k - 1))
        signatures.append(signature)
        if stage.latent_upscaler:
            unet_factor = stage.factor // stage.codec.downsample_factor
            if size % unet_factor:
                raise LdmError(f"--upscaler {pipe.model_name} (stage {k}) needs input sides that are multiples of "
                               f"{unet_factor}, but stage {k - 1} makes {size} px images")
            size *= stage.codec.downsample_factor
            continue
        if not stage.pixel:
            raise LdmError(f"--upscaler {pipe.model_name}: a latent model cannot be an upscaler unless it is a latent "
                           "upscaler (a `latent_upscale` section, as the SD x4 upscaler); a pixel-space upscaler "
                           "is a super-resolution stage (a `stage` section with `low_res_size`)")
        if not stage.super_resolution:
            raise LdmError(f"--upscaler {pipe.model_name}: not a super-resolution stage (its config has no "
                           "stage.low_res_size); give a model trained to upscale")
        if stage.stage_config.low_res_size != size:
            raise LdmError(f"--upscaler {pipe.model_name} (stage {k}) upscales {stage.stage_config.low_res_size} px "
                           f"images, but stage {k - 1} makes {size} px images; chain stages whose sizes match")
        if groups[-1] != 0:
            raise LdmError(f"--upscaler {pipe.model_name} (stage {k}) has a different text encoder from "
                           f"--model {base.model_name}: a cascade shares one text embedding, so every pixel stage "
                           "must be trained with the same (frozen) text encoder")
        size = stage.stage_config.resolution
    return groups


def load_cascade(base, upscalers=(), *, device: str | None = None, dtype=None, allow_pickle: bool = False,
                 **options) -> Cascade:
    """`load_cascade(base, [sr, ...])(prompt, seed=0)`: models (paths or loaded pipelines) run as one cascade.
    "default" names the bundled model as the base and its bundled 64 -> 256 stage as an upscaler:
    `load_cascade("default", ["default"])`."""
    def pipeline(model):
        if isinstance(model, Pipeline):
            return model
        return load_pipeline(model, device=device, dtype=dtype, allow_pickle=allow_pickle)

    if isinstance(upscalers, (str, os.PathLike, Pipeline)):  # one stage, not a sequence of its characters
        upscalers = [upscalers]
    upscalers = [default_upscaler_path() if m == DEFAULT else m for m in upscalers]
    return Cascade([pipeline(base), *(pipeline(m) for m in upscalers)], **options)


def use_model_defaults(pipe, **given) -> dict:
    """The call's common steps / guidance / sampler: the user's where given (not None), else the model's own.

    A model's own defaults are its stages' `default_settings` (DeepFloyd IF: 100 / 50 steps, guidance 7 / 4, ddpm). For a
    cascade each stage keeps its own: they become the per-stage lists where the user set neither the common value nor
    a per-stage list (`pipe.options`); the common value is then GenerationSettings' default.
    """
    out = {}
    for name in SAMPLING_DEFAULTS:
        own = [s.default_settings.get(name) for s in pipe.stages]
        fallback = getattr(GenerationSettings, name)
        if given.get(name) is not None:
            out[name] = given[name]
        elif isinstance(pipe, Cascade):
            out[name] = fallback
            if pipe.options[f"stage_{name}"] is None and any(v is not None for v in own):
                pipe.options[f"stage_{name}"] = own
        else:
            out[name] = own[0] if own[0] is not None else fallback
    return out



def model_sampling_defaults(pipe) -> dict:
    """What `pipe` samples with where the caller gives no steps / guidance / sampler, for each of them the model has
    its own value of (a `stage` section; for a cascade, any stage's): `{name: value}`, or `{name: (value per stage)}`
    for a cascade whose stages run different values (a stage without its own runs GenerationSettings' default, as the
    cascade does). Names no stage has its own value of are left out: the caller's default decides them."""
    if isinstance(pipe, Cascade):  # the very path of a call without them: each stage's own, else the common default
        options, settings = pipe._own_defaults(pipe.options, {})
        ran = pipe.stage_settings(GenerationSettings(**settings), **options)
    else:
        ran = [pipe.settings()]
    out = {}
    for name in SAMPLING_DEFAULTS:
        if all(s.default_settings.get(name) is None for s in pipe.stages):
            continue
        per_stage = tuple(getattr(s, name) for s in ran)
        out[name] = per_stage[0] if len(set(per_stage)) == 1 else per_stage
    return out

"""What a user picks per generation, and the one place that checks it (the CLI, generate_to_folder and `pipe()`)."""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field, fields

from ldm.diffusion.plans import sampling_plan
from ldm.diffusion.sampler_registry import check_sampler_options, check_sigmas
from ldm.errors import ConfigError, LdmError
from ldm.models.micro_conditioning import MICRO_FIELDS, micro_values
from ldm.models.text_encoders import check_clip_skip_value

IMG2IMG_STRENGTH = 0.8  # diffusers' defaults: img2img keeps 20% of the schedule's noise steps for the image
SDXL_IMG2IMG_STRENGTH = 0.3  # diffusers' StableDiffusionXLImg2ImgPipeline: a refiner pass keeps most of the image
INPAINT_STRENGTH = 1.0  # inpainting starts from pure noise


@dataclass
class GenerationSettings:
    """Per-call choices; guidance and the img2img / inpainting strengths default to diffusers' values, the sampler and
    steps to ldm's own (diffusers' pipeline takes its folder's scheduler and 50 steps: docs/samplers.md)."""

    sampler: str = "dpmpp_2m"
    steps: int = 30
    guidance: float = 7.5
    guidance_rescale: float = 0.0
    seed: int = 0
    n: int = 1  # images per prompt
    height: int | None = None
    width: int | None = None
    strength: float | None = None  # img2img / inpainting: fraction of the schedule run (None: the mode's default)
    sampler_options: dict = field(default_factory=dict)  # extra sampler arguments, e.g. {"eta": 0.5} for ddim
    eta: float | None = None  # DDIM stochasticity: the same as sampler_options={"eta": ...}
    dynamic_threshold: float | None = None  # percentile; None: the model's default (pixel models on), 0: off
    # SDXL: original_size, crops_coords_top_left, target_size, aesthetic_score (and negative_*); unset: diffusers'
    # defaults (the image size, (0, 0), 6.0 / 2.5). Models without micro-conditioning ignore it.
    micro_conditioning: dict = field(default_factory=dict)
    # diffusers' clip_skip: read a CLIP text encoder that many layers before the model's own (None or 0: the model's
    # own; 1 is A1111's "Clip skip 2"), for the prompt and the negative prompt alike (docs/clip-skip.md)
    clip_skip: int | None = None
    # The sigma schedule (sampler_registry.SIGMA_SCHEDULES): "model" = the model's scheduler config; "karras" = its
    # use_karras_sigmas=true (diffusers' from_config(..., use_karras_sigmas=True)), "exponential" / "beta" its
    # use_exponential_sigmas / use_beta_sigmas=true, for the samplers that read that key
    sigmas: str = "model"

    @classmethod
    def from_call(cls, settings: dict) -> "GenerationSettings":
        """The settings of a `pipe(...)` call's keywords: a name that is not a setting (a typo) is an error that
        lists the settings, not a TypeError from the constructor."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise LdmError(f"unknown generation setting(s) {', '.join(map(repr, unknown))}; the settings are "
                           f"{', '.join(sorted(known))}")
        return cls(**settings)

    def options(self) -> dict:
        """The sampler's extra keyword arguments (`eta` folded in)."""
        if self.eta is None:
            return dict(self.sampler_options)
        return {**self.sampler_options, "eta": self.eta}


def with_defaults(settings: dict, defaults: dict) -> dict:
    """`settings` with steps / guidance / sampler that are absent or None taken from `defaults` (a stage's own, e.g.
    the x4 upscaler's 75 steps at guidance 9, DeepFloyd IF's ddpm), else left to GenerationSettings' defaults."""
    out = dict(settings)
    for name in ("steps", "guidance", "sampler"):
        if out.get(name) is None:
            out.pop(name, None)
            if name in defaults:
                out[name] = defaults[name]
    return out


def first_step(steps: int, strength: float) -> int:
    """Steps skipped when starting from an image at `strength` (diffusers' rule: run int(steps * strength))."""
    return steps - min(int(steps * strength), steps)


SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_seed(seed, count: int = 1) -> None:
    """`seed`, and the `count - 1` seeds after it (prompt i of a run uses seed + i), fit a torch generator."""
    try:
        if isinstance(seed, bool):  # operator.index(True) is 1: a flag passed as a seed by mistake
            raise TypeError
        seed = operator.index(seed)
    except TypeError:
        raise LdmError(f"--seed must be an integer, got {seed!r}") from None
    low, high = SEED_RANGE
    if not low <= seed <= high - (count - 1):
        more = f"; prompt i uses seed + i, so with {count} prompts it is at most {high - count + 1}" if count > 1 else ""
        raise LdmError(f"--seed {seed} is out of range: a seed lies in [{low}, {high}]{more}")


def check_batch_seeds(prompts: list, seeds: list) -> None:
    """`pipe.batch`'s seeds: one per prompt, each in a generator's range."""
    if len(prompts) != len(seeds):
        raise LdmError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    for seed in seeds:
        check_seed(seed)


def check_guidance(scale, option: str = "--guidance") -> float:
    """A classifier-free guidance scale: a finite number, 0 or more; returned as given.

    As in diffusers, a scale up to 1 turns guidance off (the conditional model alone) and one above 1 steers towards the
    prompt. A negative scale is refused: ldm has no use for it (it too would only turn guidance off), and it is almost
    always a typo (`--guidance -7.5`, `--guidance=-1` for 1)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise LdmError(f"{option} must be a number, got {scale!r}")
    if not math.isfinite(scale):
        raise LdmError(f"{option} must be a finite number, got {scale}")
    if scale < 0:
        raise LdmError(f"{option} {float(scale):g} is negative: a guidance scale is 0 or more, and the smallest "
                       "meaningful values are 0 and 1 (up to 1 guidance is off: the conditional model alone); above 1 "
                       "it steers towards the prompt, e.g. 7.5")
    return scale


def check_settings(s: GenerationSettings, *, factor: int, schedule_config, conditional: bool = True,
                   from_image: bool = False) -> None:
    """Reject bad settings before any work, with a message that says what to change."""
    check_sampler_options(s.sampler, s.options())  # an unknown sampler or option names the choices
    check_sigmas(s.sampler, s.sigmas)  # karras with ddim names the samplers that take it
    check_seed(s.seed)
    if isinstance(s.steps, bool) or not isinstance(s.steps, int) or s.steps <= 0:
        raise LdmError(f"--steps must be a positive number of sampling steps, got {s.steps}")
    for name, value in (("n", s.n), ("height", s.height), ("width", s.width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            hint = " (512 / 2 is a float: use 512 // 2)" if name != "n" and isinstance(value, float) else ""
            raise LdmError(f"--{name} must be an integer, got {value!r}{hint}")
    check_guidance(s.guidance)
    check_clip_skip_value(s.clip_skip)
    if isinstance(s.guidance_rescale, bool) or not isinstance(s.guidance_rescale, numbers.Real):
        raise LdmError(f"--guidance-rescale must be a number, got {s.guidance_rescale!r}")
    for name, value in (("guidance-rescale", s.guidance_rescale), ("strength", s.strength),
                        ("dynamic-threshold", s.dynamic_threshold), ("eta", s.eta),
                        *((f"sampler option {k}", v) for k, v in s.sampler_options.items())):
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise LdmError(f"--{name} must be a finite number, got {value}")
    if s.dynamic_threshold is not None and not 0.0 <= s.dynamic_threshold <= 1.0:
        raise LdmError(f"--dynamic-threshold must be a percentile in (0, 1] (e.g. 0.995), or 0 for off; "
                       f"got {s.dynamic_threshold}")
    if not 0.0 <= s.guidance_rescale <= 1.0:
        raise LdmError(f"--guidance-rescale must lie in [0, 1], got {s.guidance_rescale}")
    if s.guidance > 1.0 and not conditional:
        raise LdmError(f"--guidance {s.guidance}: this model has no text encoder, so there is nothing to guide "
                       "towards; use --guidance 1")
    micro_values(tuple(MICRO_FIELDS), 1, 1, s.micro_conditioning)  # unknown names and wrong lengths say so
    micro_values(tuple(MICRO_FIELDS), 1, 1, s.micro_conditioning, negative=True)
    if s.n <= 0:
        raise LdmError(f"--n must be positive, got {s.n}")
    for name, value in (("height", s.height), ("width", s.width)):
        if value is not None and (value <= 0 or value % factor):
            raise LdmError(f"--{name} {value} is not a positive multiple of the model's factor {factor}; "
                           f"try {max(factor, round(value / factor) * factor)}")
    if s.strength is not None and not from_image:
        raise LdmError("--strength applies to img2img and inpainting; give --init-image too")
    if from_image and not 0.0 < s.strength <= 1.0:
        raise LdmError(f"--strength must lie in (0, 1], got {s.strength}")
    try:
        sampling_plan(schedule_config, s.sampler, s.steps, s.sigmas)
    except (ConfigError, ValueError, IndexError) as e:
        raise LdmError(f"cannot sample {s.steps} steps with {s.sampler} on this model's schedule: {e}") from e
    if from_image and s.strength < 1.0 and first_step(s.steps, s.strength) >= s.steps:
        raise LdmError(f"--strength {s.strength} with --steps {s.steps} leaves no step to run; raise either")


def check_prompts(prompts: list[str], negative_prompt: str | None, guidance: float) -> None:
    """Refuse guidance with nothing to steer by: an empty prompt and no negative prompt make CFG the identity."""
    if guidance > 1.0 and not (negative_prompt or "").strip() and any(not p.strip() for p in prompts):
        raise LdmError(f"--guidance {guidance} with an empty prompt and no negative prompt: guidance has nothing to "
                       "steer by (it would only double the work); give a prompt, or --guidance 1 for an "
                       "unconditional image")

"""The sampler registry: one entry per sampler, read by `sampling_plan`, the pipeline and the command line.

An entry holds the sampler function, its timestep kind (which diffusers timestep selection `sampling_plan` copies
for it), its default timestep spacing and the options a user may set, with their defaults. A new sampler is one
function in `samplers.py` (or anywhere) plus one `register_sampler(SamplerSpec(...))`; nothing else changes.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from types import MappingProxyType
from typing import Any, Callable, Iterator

import torch

from ldm.diffusion.dpm_singlestep import sample_dpm_adaptive, sample_dpm_fast
from ldm.diffusion.dpm_solvers import (
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from ldm.diffusion.samplers import (
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_unipc,
)
from ldm.diffusion.schedules import SIGMA_CONFIG_KEYS, TIMESTEP_SPACINGS
from ldm.errors import ConfigError, LdmError

# The timestep selections of diffusers' schedulers that `sampling_plan` reproduces (see plans.py):
#   ddim            DDIMScheduler: integer timesteps, VP start, ends at alpha_bar of t - T // steps
#   ddpm            DDPMScheduler: integer timesteps, VP start, ends at sigma 0
#   dpm_multistep   DPMSolverMultistepScheduler / UniPCMultistepScheduler: steps + 1 points less the last, VP start
#   euler_discrete  EulerDiscreteScheduler and kin (Heun, LMS, KDPM2, KDPM2Ancestral, DPMSolverSDE): float
#                   timesteps, VE start (init_noise_sigma)
#   sigma_range     (no diffusers peer) k-diffusion's DPM fast / adaptive: the model's sigma_max down to sigma_min,
#                   steps + 1 points, no final 0, VE start
TIMESTEP_KINDS = ("ddim", "ddpm", "dpm_multistep", "euler_discrete", "sigma_range")
# What the mirrored diffusers scheduler does to the log-sigma timesteps of Karras sigmas before the network sees them
# (SamplerSpec.karras_timesteps): "unrounded" keeps them (Euler, Heun, LMS, DPMSolverSDE; a dpm_multistep plan's int64
# cast then truncates them), "rounded" rounds them (KDPM2 and its ancestral twin, UniPC), "rounded_except_cosine"
# rounds them but on the cosine schedule, where they stay unrounded (DPMSolverMultistepScheduler: truncated).
KARRAS_TIMESTEPS = ("unrounded", "rounded", "rounded_except_cosine")
# Keywords every sampler takes from `run_sampler` or from the plan: never user options.
_RESERVED = {"generator", "callback", "disable_progress", "sigmas_next", "first_order", "noise_sampler",
             "noised_steps"}
# Sampling keys of a scheduler config that some diffusers schedulers read and others ignore (SamplerSpec.config_keys).
# clip_sample: only DDPMScheduler, DDIMScheduler and HeunDiscreteScheduler clip x0 (`Stage.thresholding`: a pixel
# model's, with dynamic thresholding off); DPM-Solver, UniPC, Euler and the rest have no such key.
CONFIG_KEYS = (*SIGMA_CONFIG_KEYS, "final_sigmas_type", "clip_sample")
# A generation's sigma schedule (`--sigmas`, `pipe(..., sigmas=)`): "model" follows the model's scheduler config;
# "karras" asks for Karras sigmas as that config's use_karras_sigmas=true would (diffusers'
# `Scheduler.from_config(config, use_karras_sigmas=True)`, A1111's "Karras" samplers), "exponential" and "beta" for
# log-spaced and Beta(0.6, 0.6)-spaced sigmas likewise (use_exponential_sigmas, use_beta_sigmas), each for the
# samplers that read its key.
SIGMA_SCHEDULES = {"model": None, "karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas",
                   "beta": "use_beta_sigmas"}
# Samplers that size their own steps: `--steps` does not set their number of model evaluations (dpm_adaptive's
# rtol / atol do); it only places img2img's start, as for the others.
ADAPTIVE_SAMPLERS = ("dpm_adaptive",)


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: `function(denoiser, x, sigmas, cond, *, generator, callback, disable_progress, **options)`."""

    name: str
    function: Callable
    timestep_kind: str  # one of TIMESTEP_KINDS
    default_spacing: str  # the mirrored diffusers scheduler's own timestep_spacing default
    options: Mapping[str, float] = field(default_factory=dict)  # user-settable keywords and their defaults
    # The scheduler-config sampling keys (CONFIG_KEYS) the mirrored diffusers scheduler reads; a model's
    # use_karras_sigmas (and its exponential / beta twins) / final_sigmas_type reach this sampler's plan, and its
    # clip_sample this sampler's x0 (`Stage.thresholding`), only where they are named here.
    config_keys: tuple[str, ...] = ()
    # What the options must satisfy together, beyond each one's range: `check(options)` (the defaults with the user's
    # options over them) returns a refusal's reason, or None (dpm_adaptive's order is 2 or 3).
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    karras_timesteps: str = "unrounded"  # one of KARRAS_TIMESTEPS

    def __post_init__(self):
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "config_keys", tuple(self.config_keys))


@dataclass(frozen=True)
class OptionRange:
    """The values for which a sampler option means something: from `low` to `high`, an end excluded where open."""

    meaning: str  # what the option is, said in the refusal
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# What the options of k-diffusion's names mean, hence the values they may take. Every sampler's option of such a name
# is held to it (a plug-in's `eta` is the same eta); an option of another name need only be finite. A negative eta or
# s_churn used to reach the samplers: dpmpp_2m_sde took the square root of a negative number (a traceback after the
# model had loaded), the ancestral samplers silently flipped the sign of their noise (and failed alike at eta -3),
# the churned ones silently denoised at a sigma below the one the sample has.
OPTION_RANGES: Mapping[str, OptionRange] = MappingProxyType({
    "eta": OptionRange("the amount of fresh noise per step: 0 is deterministic (DDIM), 1 the ancestral / SDE "
                       "sampler, more adds more", low=0.0, high_open=True),
    "s_noise": OptionRange("a factor on the standard deviation of the added noise (1: unchanged, 0: none)", low=0.0,
                           high_open=True),
    "s_churn": OptionRange("EDM's churn, the noise added back at each step (0: none)", low=0.0, high_open=True),
    "s_tmin": OptionRange("the lowest noise level (sigma) that is churned", low=0.0, high_open=True),
    "s_tmax": OptionRange("the highest noise level (sigma) that is churned; leave it out for no limit", low=0.0),
    "r": OptionRange("where the intermediate point lies within the step, as a fraction of its log-SNR change",
                     low=0.0, high=1.0, low_open=True, high_open=True),
    # dpm_adaptive's step-size control (k-diffusion's names): a step is accepted where its error estimate, scaled by
    # max(atol, rtol * |x|), is small enough
    "rtol": OptionRange("the relative error tolerance of each adaptive step (0: atol alone)", low=0.0, high_open=True),
    "atol": OptionRange("the absolute error tolerance of each adaptive step, in the sample's units", low=0.0,
                        low_open=True, high_open=True),
    "h_init": OptionRange("the first adaptive step's length in log-SNR", low=0.0, low_open=True, high_open=True),
    "accept_safety": OptionRange("the smallest step-size factor for which a step is accepted", low=0.0, high=1.0,
                                 low_open=True),
})


_REGISTRY: dict[str, SamplerSpec] = {}


class _SamplerFunctions(Mapping):
    """A live, read-only view name -> sampler function of the registry."""

    def __getitem__(self, name: str) -> Callable:
        return _REGISTRY[name].function

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)


SAMPLERS: Mapping[str, Callable] = _SamplerFunctions()


def register_sampler(spec: SamplerSpec, *, replace: bool = False) -> SamplerSpec:
    """Add a sampler; its options must be keyword parameters of its function with numeric defaults (inside
    OPTION_RANGES for the options named there)."""
    if spec.name in _REGISTRY and not replace:
        raise LdmError(f"sampler {spec.name!r} is already registered (pass replace=True to override it)")
    if spec.timestep_kind not in TIMESTEP_KINDS:
        raise LdmError(f"sampler {spec.name!r}: timestep_kind must be one of {', '.join(TIMESTEP_KINDS)}, "
                       f"got {spec.timestep_kind!r}")
    if spec.karras_timesteps not in KARRAS_TIMESTEPS:
        raise LdmError(f"sampler {spec.name!r}: karras_timesteps must be one of {', '.join(KARRAS_TIMESTEPS)}, "
                       f"got {spec.karras_timesteps!r}")
    unknown = set(spec.config_keys) - set(CONFIG_KEYS)
    if unknown:
        raise LdmError(f"sampler {spec.name!r}: config_keys must be among {', '.join(CONFIG_KEYS)}, got "
                       f"{', '.join(sorted(unknown))}")
    if spec.default_spacing not in TIMESTEP_SPACINGS:
        raise LdmError(f"sampler {spec.name!r}: default_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}")
    params = inspect.signature(spec.function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for option, default in spec.options.items():
        if option in _RESERVED or not (takes_any or option in params):
            raise LdmError(f"sampler {spec.name!r}: option {option!r} is not a keyword of {spec.function.__name__}")
        if isinstance(default, bool) or not isinstance(default, Real):
            raise LdmError(f"sampler {spec.name!r}: option {option!r} needs a numeric default, got {default!r}")
        if option in OPTION_RANGES and default not in OPTION_RANGES[option]:
            raise LdmError(f"sampler {spec.name!r}: option {option!r} has the default {default!r} outside "
                           f"{OPTION_RANGES[option]}, the range of every sampler's {option}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_sampler(name: str) -> None:
    """Remove a sampler (plug-ins and tests that add one for a while)."""
    _REGISTRY.pop(name, None)


def sampler_names() -> list[str]:
    return list(_REGISTRY)


def get_sampler(name: str) -> SamplerSpec:
    """The registry entry for `name`; an LdmError listing the choices when there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def check_option_values(options: Mapping[str, Any] | None, *, about: str = "") -> None:
    """Each option's value is a finite number inside its OPTION_RANGES entry, and s_tmin <= s_tmax. No sampler is
    needed, so the command line checks the values before the model (and with it the default sampler) is known;
    `about` is appended to a refusal (what the sampler takes)."""
    options = dict(options or {})
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ConfigError(f"sampler option {key}={value!r} must be a finite number{about}")
        allowed = OPTION_RANGES.get(key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"sampler option {key}={value:g} is out of range: {key} lies in {allowed}, "
                              f"{allowed.meaning}{about}")
    if "s_tmin" in options and "s_tmax" in options and options["s_tmin"] > options["s_tmax"]:
        raise ConfigError(f"sampler options s_tmin={options['s_tmin']:g} > s_tmax={options['s_tmax']:g}: no noise "
                          f"level lies in the churn window [s_tmin, s_tmax], so s_churn would do nothing{about}")


def _describe(spec: SamplerSpec) -> str:
    if not spec.options:
        return f"sampler {spec.name!r} takes no options"
    return f"sampler {spec.name!r} takes " + ", ".join(f"{k} (default {v})" for k, v in spec.options.items())


def check_sampler_options(name: str, options: Mapping[str, Any] | None) -> dict:
    """The user's options for sampler `name`, checked: known names, finite numbers inside their OPTION_RANGES
    (integers where the default is).

    Returns only the options given (as float, or int for integer options such as LMS's order), so that what is
    recorded is what the user chose; `run_sampler` fills in the defaults.
    """
    spec = get_sampler(name)
    for key in options or {}:
        if key not in spec.options:
            raise ConfigError(f"unknown sampler option {key!r}; {_describe(spec)}")
    check_option_values(options, about=f"; {_describe(spec)}")
    checked = {}
    for key, value in (options or {}).items():
        if isinstance(spec.options[key], int):  # a count (LMS's order): a whole number of at least 1
            if value != int(value) or value < 1:
                raise ConfigError(f"sampler option {key}={value!r} must be a whole number >= 1; {_describe(spec)}")
            value = int(value)
        checked[key] = value if isinstance(value, int) else float(value)
    if spec.check is not None and (reason := spec.check({**spec.options, **checked})):
        raise ConfigError(f"sampler {name!r}: {reason}")
    return checked


def sigma_samplers(schedule: str) -> list[str]:
    """The samplers that take sigma schedule `schedule` (those whose diffusers scheduler reads its config key)."""
    key = SIGMA_SCHEDULES[schedule]
    return [name for name in sampler_names() if key is None or key in get_sampler(name).config_keys]


def samplers_without_sigmas() -> list[str]:
    """The samplers that take no sigma schedule but the model's: their diffusers scheduler lacks the keys (ddim, ddpm,
    euler_a), or they walk the model's whole sigma range (dpm_fast, dpm_adaptive). The three keys go together."""
    takers = set(sigma_samplers("karras"))
    return [name for name in sampler_names() if name not in takers]


def check_sigmas(sampler: str, schedule: str) -> None:
    """Refuse a sigma schedule that is not one, or that `sampler`'s diffusers scheduler does not read."""
    if schedule not in SIGMA_SCHEDULES:
        raise ConfigError(f"--sigmas {schedule!r} is not a sigma schedule; use one of {', '.join(SIGMA_SCHEDULES)}")
    spec = get_sampler(sampler)
    key = SIGMA_SCHEDULES[schedule]
    if key is not None and spec.timestep_kind == "sigma_range":
        raise ConfigError(f"--sigmas {schedule} does not apply to {sampler}: it walks the model's whole sigma range "
                          "in its own steps, so only the range's ends count; the samplers that take it are "
                          f"{', '.join(sigma_samplers(schedule))}")
    if key is not None and key not in spec.config_keys:
        raise ConfigError(f"--sigmas {schedule} does not apply to {sampler}: its diffusers scheduler has no {key}; "
                          f"the samplers that take it are {', '.join(sigma_samplers(schedule))}")


def run_sampler(name: str, denoiser: Callable, x: torch.Tensor, plan, cond=None, *, options: Mapping | None = None,
                generator: torch.Generator | None = None, callback: Callable | None = None,
                progress: bool = False) -> torch.Tensor:
    """Walk `plan.sigmas` from x with sampler `name`: its defaults, then the user's options, then the plan's own
    keywords (DDIM's sigmas_next). Returns the sample in the sampler's coordinates (multiply by plan.final_scale)."""
    spec = get_sampler(name)
    kwargs = {**spec.options, **check_sampler_options(name, options), **plan.sampler_kwargs}
    return spec.function(denoiser, x, plan.sigmas.to(x.device), cond, generator=generator, callback=callback,
                         disable_progress=not progress, **kwargs)


_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}  # EDM Alg. 2, k-diffusion's names
# diffusers' schedulers read use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas together (0.42: the same 14)
_SIGMAS = SIGMA_CONFIG_KEYS  # ... and some read them but not final_sigmas_type
_BOTH = (*_SIGMAS, "final_sigmas_type")  # Euler, DPM-Solver multistep and UniPC read both
_CLIP = ("clip_sample",)  # DDPMScheduler and DDIMScheduler clip x0 (neither reads the sigma keys)
_SIGMAS_CLIP = (*_SIGMAS, "clip_sample")  # HeunDiscreteScheduler
_ADAPTIVE = {"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0,
             "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0,  # k-diffusion's defaults
             "max_nfe": 10000}  # ours: an error past this many model evaluations, not an endless run


def _check_adaptive(options: Mapping[str, Any]) -> str | None:
    """dpm_adaptive: an embedded pair of orders 1-2 or 2-3, and a controller whose step size answers the error."""
    if options["order"] not in (2, 3):
        return (f"order={options['order']} is not 2 or 3: dpm_adaptive compares DPM-Solver steps of orders 1 and 2 "
                "(order=2) or 2 and 3 (order=3, the default)")
    if options["pcoeff"] + options["icoeff"] + options["dcoeff"] <= 0:
        return (f"pcoeff + icoeff + dcoeff = {options['pcoeff'] + options['icoeff'] + options['dcoeff']:g} is not "
                "positive, so the step size would not shrink where the error is large; keep icoeff=1 (the default)")
    return None
for _spec in (
    SamplerSpec("ddpm", sample_ddpm, "ddpm", "leading", {}, _CLIP),
    SamplerSpec("ddim", sample_ddim, "ddim", "leading", {"eta": 0.0}, _CLIP),
    SamplerSpec("euler", sample_euler, "euler_discrete", "linspace", _CHURN, _BOTH),
    SamplerSpec("euler_a", sample_euler_ancestral, "euler_discrete", "linspace", {"eta": 1.0, "s_noise": 1.0}),
    SamplerSpec("heun", sample_heun, "euler_discrete", "linspace", _CHURN, _SIGMAS_CLIP),
    SamplerSpec("lms", sample_lms, "euler_discrete", "linspace", {"order": 4}, _SIGMAS),
    SamplerSpec("dpmpp_2m", sample_dpmpp_2m, "dpm_multistep", "linspace", {}, _BOTH,
                karras_timesteps="rounded_except_cosine"),
    SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, "dpm_multistep", "linspace", {"eta": 1.0, "s_noise": 1.0},
                _BOTH, karras_timesteps="rounded_except_cosine"),
    SamplerSpec("unipc", sample_unipc, "dpm_multistep", "linspace", {}, _BOTH, karras_timesteps="rounded"),
    # k-diffusion's DPM-Solver family (dpm_solvers.py), on the timesteps of the diffusers scheduler users compare:
    SamplerSpec("dpm_2", sample_dpm_2, "euler_discrete", "linspace", _CHURN, _SIGMAS,  # KDPM2DiscreteScheduler
                karras_timesteps="rounded"),
    SamplerSpec("dpm_2_ancestral", sample_dpm_2_ancestral, "euler_discrete", "linspace",  # KDPM2Ancestral...
                {"eta": 1.0, "s_noise": 1.0}, _SIGMAS, karras_timesteps="rounded"),
    SamplerSpec("dpmpp_2s_ancestral", sample_dpmpp_2s_ancestral, "euler_discrete", "linspace",  # (no diffusers peer)
                {"eta": 1.0, "s_noise": 1.0}, _SIGMAS),
    SamplerSpec("dpmpp_sde", sample_dpmpp_sde, "euler_discrete", "linspace",  # DPMSolverSDEScheduler
                {"eta": 1.0, "s_noise": 1.0, "r": 0.5}, _SIGMAS),
    SamplerSpec("dpmpp_3m_sde", sample_dpmpp_3m_sde, "dpm_multistep", "linspace",  # DPMSolverMultistep, order 3
                {"eta": 1.0, "s_noise": 1.0}, _BOTH, karras_timesteps="rounded_except_cosine"),
    # k-diffusion's singlestep DPM-Solver over the model's sigma range (dpm_singlestep.py; no diffusers peer): --steps
    # is dpm_fast's number of model evaluations; dpm_adaptive's follows rtol / atol (its steps only place a strength)
    SamplerSpec("dpm_fast", sample_dpm_fast, "sigma_range", "linspace", {"eta": 0.0, "s_noise": 1.0}),
    SamplerSpec("dpm_adaptive", sample_dpm_adaptive, "sigma_range", "linspace", _ADAPTIVE, check=_check_adaptive),
):
    register_sampler(_spec)

"""Sampling plans: the sigmas, initial noise scale and final scale that make a sampler reproduce diffusers' scheduler.

The pipeline does `x = randn(shape, generator) * plan.init_noise_scale; x = run_sampler(name, denoiser, x, plan, cond);
latents = x * plan.final_scale`. Each sampler follows the timestep selection of the diffusers scheduler it mirrors
(read from diffusers 0.42), named by its registry entry's timestep kind: DDIMScheduler ("ddim"), DDPMScheduler
("ddpm"), DPMSolverMultistepScheduler and UniPCMultistepScheduler ("dpm_multistep"), EulerDiscreteScheduler and its
kin Euler a, Heun and LMS ("euler_discrete"); k-diffusion's DPM fast and DPM adaptive, which diffusers lacks, take
the model's whole sigma range ("sigma_range"). A scheduler config's use_karras_sigmas / use_exponential_sigmas /
use_beta_sigmas and final_sigmas_type change the plan of the samplers whose diffusers scheduler reads them
(`SamplerSpec.config_keys`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import torch

from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.sampler_registry import SIGMA_SCHEDULES, check_sigmas, get_sampler
from ldm.diffusion.schedules import (
    SIGMA_CONFIG_KEYS,
    DiscreteSchedule,
    ScheduleConfig,
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
)
from ldm.errors import ConfigError

# The sigmas each SIGMA_CONFIG_KEYS key puts in place of the spaced timesteps': (n, sigma_min, sigma_max) -> (n + 1,)
CONVERTED_SIGMAS = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas,
                    "use_beta_sigmas": beta_sigmas}

@dataclass(frozen=True)
class SamplingPlan:
    """What a sampler needs to start and finish: x_T = randn * init_noise_scale, result = x * final_scale."""

    sigmas: torch.Tensor  # (steps + 1,) float32, decreasing, ending with 0 or DDIM's final sigma
    init_noise_scale: float  # std of the initial noise in VE coordinates (diffusers' init_noise_sigma, mapped)
    final_scale: float  # maps the sampler's VE output back to diffusers' output scale
    timesteps: torch.Tensor  # the (steps,) diffusers timesteps, for reference
    sampler_kwargs: dict = field(default_factory=dict)  # extra keyword arguments for the sampler (DDIM's sigmas_next)
    # The network sees `timesteps[i]` at `sigmas[i]` (a plan of a discrete model's diffusers scheduler: its spaced
    # timesteps, or those it derives from Karras, exponential or beta sigmas by log-sigma interpolation, rounded or
    # truncated as it does). False: the timesteps only place img2img's start (dpm_fast / dpm_adaptive) or there are
    # none (EDM). Either way a discrete model's network sees the log-sigma-interpolated timestep at any other sigma
    # (midpoints, churn, DPM-Solver's stages), as diffusers and k-diffusion do (`with_network_timesteps`).
    network_timesteps: bool = False

    def with_network_timesteps(self, denoiser):
        """`denoiser` as this plan's sampler must call it: a `DiscreteDenoiser` fed the plan's timesteps at its sigmas
        (where `network_timesteps`) and log-sigma-interpolated ones at any other sigma; any other denoiser unchanged."""
        if not isinstance(denoiser, DiscreteDenoiser):
            return denoiser
        n = len(self.timesteps) if self.network_timesteps else 0
        return denoiser.at_timesteps(self.sigmas[:n], self.timesteps[:n])

    def skip(self, start: int) -> "SamplingPlan":
        """The plan without its first `start` steps (img2img starts part-way down the schedule)."""
        kwargs = {k: v[start:] for k, v in self.sampler_kwargs.items()}
        return replace(self, sigmas=self.sigmas[start:], timesteps=self.timesteps[start:], sampler_kwargs=kwargs)


def _timesteps(spacing: str, steps: int, num_train: int, steps_offset: int) -> np.ndarray:
    """diffusers' timestep selection shared by DDIM, DDPM, Euler and Heun (Lin et al. 2023, Table 2)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy() + steps_offset
    ratio = num_train / steps  # trailing
    return np.round(np.arange(num_train, 0, -ratio)) - 1


def _dpm_timesteps(spacing: str, steps: int, num_train: int, steps_offset: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's own variant: steps + 1 points with the last one dropped."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        ratio = num_train // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy() + steps_offset
    ratio = num_train / steps  # trailing
    return np.arange(num_train, 0, -ratio).round() - 1


# DPMSolverMultistepScheduler takes its last step at first order in runs shorter than this (lower_order_final)
DPM_LOWER_ORDER_FINAL_STEPS = 15


def _interp_sigmas(table: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """sigma at (float) timesteps, linear in t: `np.interp(t, arange, sigmas)` as diffusers computes it."""
    return np.interp(timesteps, np.arange(len(table)), table)


def _converted(config: ScheduleConfig, schedule: DiscreteSchedule, key: str, steps: int, sigma_min: float,
               sigma_max: float, karras_timesteps: str):
    """(`steps` sigmas of the kind `key` names from sigma_max down to sigma_min, without the final 0, and their float
    timesteps): float64, as diffusers computes both (its timesteps by log-sigma interpolation, `_sigma_to_t`), those of
    Karras sigmas rounded where the sampler's scheduler rounds them (`SamplerSpec.karras_timesteps`)."""
    sigmas = CONVERTED_SIGMAS[key](steps, float(sigma_min), float(sigma_max), dtype=torch.float64)[:-1]
    timesteps = schedule.log_sigma_to_t(sigmas).numpy()
    cosine = config.beta_schedule in ("cosine", "squaredcos_cap_v2")  # diffusers reads the name, trained betas or not
    if key == "use_karras_sigmas" and (karras_timesteps == "rounded"
                                       or karras_timesteps == "rounded_except_cosine" and not cosine):
        timesteps = timesteps.round()
    return sigmas.numpy(), timesteps


def _ddim_plan(config: ScheduleConfig, schedule: DiscreteSchedule, steps: int, spacing: str, ddpm: bool = False,
               **_):
    """DDIMScheduler / DDPMScheduler: integer timesteps, a unit-variance VP x_T and a VP result (neither reads
    use_karras_sigmas, its exponential / beta twins or final_sigmas_type)."""
    table = schedule.sigmas.numpy()
    num_train = config.num_train_timesteps
    # Rounded, not truncated: "linspace" gives fractional points (8 steps: 999 * 5 / 7 = 713.6 -> 714, 142.7 -> 143)
    timesteps = _timesteps(spacing, steps, num_train, config.steps_offset).round().astype(np.int64)
    if timesteps.max() >= num_train or timesteps.min() < 0:
        raise ConfigError(f"steps_offset {config.steps_offset} with {steps} {spacing} steps leaves the training "
                          "timesteps")
    sigmas = table[timesteps].astype(np.float64)
    kwargs = {}
    if ddpm:
        last = 0.0  # DDPMScheduler: the step after the last timestep has alpha_bar = 1
        if timesteps[-1] > 0:  # ... and still adds noise after it ("trailing", steps_offset: a learned variance shows)
            kwargs["noised_steps"] = torch.from_numpy(timesteps > 0)
    else:
        prev = int(timesteps[-1]) - num_train // steps
        alpha_to_one = config.set_alpha_to_one is not False  # DDIMScheduler's default is True
        last = float(table[prev]) if prev >= 0 else (0.0 if alpha_to_one else float(table[0]))
    sigmas = np.append(sigmas, last).astype(np.float32)
    if not ddpm:
        # diffusers' DDIM steps from t to t - T // steps, which is not always the next timestep it evaluates.
        prev = timesteps - num_train // steps
        targets = np.append(table[np.clip(prev[:-1], 0, None)], last).astype(np.float32)
        if not np.array_equal(targets, sigmas[1:]):
            kwargs = {"sigmas_next": torch.from_numpy(targets)}
    init = math.sqrt(1 + float(sigmas[0]) ** 2)
    final = 1 / math.sqrt(1 + float(sigmas[-1]) ** 2)
    return timesteps, sigmas, init, final, kwargs, True


def _ddpm_plan(config: ScheduleConfig, schedule: DiscreteSchedule, steps: int, spacing: str, **_):
    return _ddim_plan(config, schedule, steps, spacing, ddpm=True)


def _dpm_multistep_plan(config: ScheduleConfig, schedule: DiscreteSchedule, steps: int, spacing: str,
                        converted: str | None = None, last: float = 0.0, karras_timesteps: str = "unrounded"):
    """DPMSolverMultistepScheduler / UniPCMultistepScheduler: VP x_T with init_noise_sigma = 1, a VP result at the
    last sigma. Karras, exponential and beta sigmas span the whole training range whatever the spacing; the network
    sees their timesteps rounded (Karras, but DPM-Solver's on the cosine schedule) or truncated (exponential, beta:
    diffusers casts them to int64 unrounded, so the first of sigma_max is 998, not 999)."""
    table = schedule.sigmas.numpy()
    if converted is not None:
        sigmas, timesteps = _converted(config, schedule, converted, steps, table[0], table[-1], karras_timesteps)
        timesteps = timesteps.astype(np.int64)
    else:
        timesteps = _dpm_timesteps(spacing, steps, config.num_train_timesteps, config.steps_offset).astype(np.int64)
        sigmas = _interp_sigmas(table, timesteps)
    sigmas = np.append(sigmas, last).astype(np.float32)
    init = math.sqrt(1 + float(sigmas.max()) ** 2)
    kwargs = {}
    if last > 0 and steps < DPM_LOWER_ORDER_FINAL_STEPS:
        # diffusers' lower_order_final: a short run ends with a first-order step, also to a non-zero sigma
        kwargs["first_order"] = torch.arange(steps) == steps - 1
    return timesteps, sigmas, init, 1 / math.sqrt(1 + float(sigmas[-1]) ** 2), kwargs, True


def _euler_discrete_plan(config: ScheduleConfig, schedule: DiscreteSchedule, steps: int, spacing: str,
                         converted: str | None = None, last: float = 0.0, karras_timesteps: str = "unrounded"):
    """EulerDiscreteScheduler and kin: VE samplers with float timesteps, a VE result. Karras, exponential and beta
    sigmas span the spaced timesteps' sigma range, at the float timesteps of their log sigmas (KDPM2's Karras ones
    rounded)."""
    table = schedule.sigmas.numpy()
    timesteps = _timesteps(spacing, steps, config.num_train_timesteps, config.steps_offset).astype(np.float32)
    sigmas = _interp_sigmas(table, timesteps)
    if converted is not None:
        sigmas, timesteps = _converted(config, schedule, converted, steps, sigmas[-1], sigmas[0], karras_timesteps)
        timesteps = timesteps.astype(np.float32)
    sigmas = np.append(sigmas, last).astype(np.float32)
    top = float(sigmas.max())
    # diffusers' init_noise_sigma: sigma_max for linspace / trailing, sqrt(sigma_max^2 + 1) for leading.
    init = top if spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)
    return timesteps, sigmas, init, 1.0, {}, True


def _sigma_range_plan(config: ScheduleConfig, schedule: DiscreteSchedule, steps: int, spacing: str, **_):
    """DPM fast / DPM adaptive (k-diffusion's `sample_dpm_fast(model, x, sigma_min, sigma_max, n)`): the model's whole
    training sigma range, as A1111 passes it, whatever the config's spacing or Karras setting. steps + 1 points from
    sigma_max to sigma_min and no final 0: the sampler ends at sigma_min (and `dpm_fast` spends len(sigmas) - 1 = steps
    model evaluations). The points between sit at the timesteps linspace(T - 1, 0, steps + 1), so img2img's strength s
    starts at about timestep s (T - 1) (10 steps at 0.5: 499.5, where Euler's 10-step plan starts at 444) and a
    refiner's split falls where diffusers' denoising_end puts it; x_T = randn * sigma_max, a VE result. The network
    sees the log-sigma-interpolated timestep of every sigma they evaluate, as under k-diffusion's CompVisDenoiser."""
    timesteps = np.linspace(0, config.num_train_timesteps - 1, steps + 1)[::-1].astype(np.float32)
    sigmas = _interp_sigmas(schedule.sigmas.numpy(), timesteps).astype(np.float32)
    return timesteps[:-1].copy(), sigmas, float(sigmas[0]), 1.0, {}, False


# One function per timestep kind of the sampler registry (TIMESTEP_KINDS).
_KIND_PLANS = {
    "ddim": _ddim_plan,
    "ddpm": _ddpm_plan,
    "dpm_multistep": _dpm_multistep_plan,
    "euler_discrete": _euler_discrete_plan,
    "sigma_range": _sigma_range_plan,
}


def sampling_plan(schedule_config: ScheduleConfig | Mapping[str, Any], sampler: str, steps: int,
                  sigmas: str = "model") -> SamplingPlan:
    """The sigmas, initial noise scale and final scale with which `sampler` reproduces its diffusers scheduler.

    `sigmas` (SIGMA_SCHEDULES): "model" follows the config; "karras", "exponential" and "beta" plan as the config with
    use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas=true (and the other two false) does (a sampler whose
    diffusers scheduler does not read that key refuses it, `check_sigmas`).

    An EDM schedule (prediction_type "edm") gets `edm_sampling_plan` for every sampler: Karras sigmas from
    sigma_max to sigma_min, x_T = randn * sigma_max, no final rescaling; it refuses "exponential" and "beta". The
    "sigma_range" samplers (dpm_fast, dpm_adaptive) get steps + 1 of them ending at sigma_min, without the final 0.

    DDIM note: diffusers' DDIM steps from t to t - T // steps, which with "linspace" spacing or a "trailing" step
    count that does not divide T is not the next timestep it evaluates; the plan then carries
    `sampler_kwargs={"sigmas_next": ...}` for `sample_ddim` to do the same (`run_sampler` passes them on).
    Zero terminal SNR: alpha_bar_T is taken as 2**-24 (diffusers does so for Euler and DPM-Solver; its DDIM and DDPM
    use 0, a difference of ~2e-4 in the first step's x0 estimate).
    """
    if not isinstance(schedule_config, ScheduleConfig):
        schedule_config = ScheduleConfig.from_diffusers(schedule_config)
    spec = get_sampler(sampler)
    check_sigmas(sampler, sigmas)
    if schedule_config.is_edm:  # continuous sigma: every sampler walks the same Karras sigmas
        if sigmas not in ("model", "karras"):
            raise ConfigError(f"--sigmas {sigmas} does not apply to an EDM model (continuous sigma, sampled on its own "
                              "Karras sigmas from sigma_max to sigma_min); leave --sigmas out (model) or use karras")
        if steps < 1:
            raise ConfigError(f"steps must be at least 1, got {steps}")
        c = schedule_config
        if spec.timestep_kind == "sigma_range":  # steps + 1 points down to sigma_min, no final 0 (see above)
            sigmas = karras_sigmas(steps + 1, c.sigma_min, c.sigma_max, c.rho)[:-1]
            return SamplingPlan(sigmas, float(sigmas[0]), 1.0, sigmas[:-1].clone())
        return edm_sampling_plan(steps, c.sigma_min, c.sigma_max, c.rho)
    num_train = schedule_config.num_train_timesteps
    if not 1 <= steps <= num_train:
        raise ConfigError(f"steps must lie in [1, {num_train}] (the training timesteps), got {steps}")
    spacing = schedule_config.timestep_spacing or spec.default_spacing
    if SIGMA_SCHEDULES[sigmas] is not None:  # the one key asked for, on; the other two off
        schedule_config = replace(schedule_config, **{key: key == SIGMA_SCHEDULES[sigmas] for key in SIGMA_CONFIG_KEYS})
    schedule = DiscreteSchedule.from_config(schedule_config)
    # the sigma keys and final_sigmas_type apply where the mirrored diffusers scheduler reads them
    converted = next((key for key in SIGMA_CONFIG_KEYS
                      if getattr(schedule_config, key) and key in spec.config_keys), None)
    sigma_min_last = schedule_config.final_sigmas_type == "sigma_min" and "final_sigmas_type" in spec.config_keys
    timesteps, sigmas, init, final, kwargs, network_timesteps = _KIND_PLANS[spec.timestep_kind](
        schedule_config, schedule, steps, spacing, converted=converted,
        last=schedule.sigma_min if sigma_min_last else 0.0, karras_timesteps=spec.karras_timesteps)
    return SamplingPlan(torch.from_numpy(sigmas), init, final, torch.from_numpy(timesteps.copy()), kwargs,
                        network_timesteps)


def edm_sampling_plan(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> SamplingPlan:
    """Karras sigmas for a continuous-sigma (EDM) model: x_T = randn * sigma_max (Karras et al. 2022, Alg. 1 line 1)."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    return SamplingPlan(sigmas, float(sigmas[0]), 1.0, sigmas[:-1].clone())

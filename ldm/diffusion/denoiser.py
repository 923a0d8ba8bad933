"""Denoisers: a network plus a parameterisation, spoken to as `denoiser(x, sigma, cond) -> x0`.

x = x0 + sigma * noise (variance-exploding coordinates), sigma a (b,) tensor, cond a dict of network keyword
arguments or None. The network is any callable `network(x_in, c_noise, **cond)`; it is never imported here.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from ldm.diffusion.scalings import EDMScaling, scaling_for
from ldm.diffusion.schedules import FIXED_VARIANCE_TYPES, DiscreteSchedule, ScheduleConfig


# True while a sampler evaluates between the plan's sigmas (`between_plan_sigmas`).
_BETWEEN_PLAN_SIGMAS = ContextVar("between_plan_sigmas", default=False)


@contextmanager
def between_plan_sigmas():
    """Mark the denoiser calls inside as a step's inner stage (a midpoint), not a call at one of the plan's sigmas: a
    `DiscreteDenoiser.at_timesteps` then feeds the log-sigma timestep even where the sigma equals a plan sigma, as
    diffusers' KDPM2 ancestral scheduler and k-diffusion do at the DPM2 / DPM++ 2S ancestral midpoint at eta 1 (the
    geometric mean of sigma and sigma_down = sigma_next^2 / sigma is sigma_next itself). Passes through any wrapper."""
    token = _BETWEEN_PLAN_SIGMAS.set(True)
    try:
        yield
    finally:
        _BETWEEN_PLAN_SIGMAS.reset(token)


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(b,) -> (b, 1, ..., 1) with `ndim` dimensions, to broadcast against x."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """A float, 0-dim or (b,) sigma as a (b,) float tensor on x's device."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


class Denoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, eq. 7).

    `dtype`: the network's precision, None for x's own. A float16 network is given a float32 x (and returns x0 in
    float32): x = x0 + sigma * noise reaches 4-5 sigma_max, and sigma_max is 20291 on the cosine schedule, past
    float16's 65504. Only c_in x, about unit variance, is cast to the network's precision.
    """

    def __init__(self, network, scaling, dtype: torch.dtype | None = None, variance_type: str | None = None):
        super().__init__()
        self.network = network
        self.scaling = scaling
        self.network_dtype = dtype
        self.variance_type = variance_type  # the schedule's (ScheduleConfig.variance_type): a fixed one wins

    def noise_input(self, c_noise: torch.Tensor) -> torch.Tensor:
        """The network's noise-level input for the scaling's c_noise."""
        return c_noise

    def forward_with_variance(self, x: torch.Tensor, sigma, cond: dict | None = None):
        """(x0, variance output or None): a network with 2x the channels of x returns [output, variance] halves.

        The variance output is v in [-1, 1] between log beta_tilde and log beta (Nichol & Dhariwal 2021, eq. 15);
        with `variance_type` "learned" it is the variance itself (diffusers' reading, `sample_ddpm`). A fixed
        `variance_type` replaces it, as diffusers' DDPMScheduler ignores a learned half then: fixed_small(_log) is
        None (beta_tilde), fixed_large(_log) v = 1 (beta: diffusers' fixed_large_log step is NaN, docs/deepfloyd-if.md)."""
        sigma = batch_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in self.scaling(sigma))
        x_in = (x * c_in).to(self.network_dtype or x.dtype)
        out = self.network(x_in, self.noise_input(c_noise.flatten()), **(cond or {}))
        if not torch.is_tensor(out):  # diffusers-style output objects
            out = out.sample
        variance = None
        if out.shape[1] == 2 * x.shape[1]:  # learned variance (Nichol & Dhariwal 2021): [eps | v]
            out, variance = out.chunk(2, dim=1)
        if self.variance_type in FIXED_VARIANCE_TYPES:
            variance = torch.ones_like(out) if self.variance_type.startswith("fixed_large") else None
        return (c_skip * x + c_out * out).to(x.dtype), variance

    def forward(self, x: torch.Tensor, sigma, cond: dict | None = None) -> torch.Tensor:
        return self.forward_with_variance(x, sigma, cond)[0]


class DiscreteDenoiser(Denoiser):
    """A network trained on discrete timesteps (eps / v / x0), called as `network(x * c_in, t, **cond)`.

    t = schedule.sigma_to_t(sigma) is a float32 timestep, an exact integer at the training sigmas (training, and any
    caller without a plan). `at_timesteps` gives the network what the peers feed it when sampling a plan instead (the
    scalings keep sigma itself).
    """

    def __init__(self, network, schedule: DiscreteSchedule, prediction: str = "epsilon",
                 dtype: torch.dtype | None = None, variance_type: str | None = None,
                 timesteps: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__(network, scaling_for(prediction), dtype, variance_type)
        self.schedule = schedule
        self.prediction = prediction
        self.timesteps = timesteps  # (sigmas, their timesteps) of `at_timesteps`, or None
        self._timesteps_on: dict = {}  # device -> `timesteps` there, copied once (no host-to-device copy per step)

    def at_timesteps(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> "DiscreteDenoiser":
        """The same network and schedule, fed `timesteps[i]` at `sigmas[i]` and the log-sigma-interpolated timestep
        (`schedule.log_sigma_to_t`) at any other sigma (every sigma, for empty tensors; also at a plan sigma inside
        `between_plan_sigmas`): what diffusers' schedulers feed
        the network at a plan's sigmas (`SamplingPlan.with_network_timesteps`) and at KDPM2's and DPM++ SDE's
        midpoints, and what k-diffusion's CompVisDenoiser feeds it at every sigma (dpm_fast, dpm_adaptive)."""
        # float32, as the samplers pass sigmas and the network receives timesteps (diffusers' are float32 or int64)
        table = (torch.as_tensor(sigmas).float().cpu(), torch.as_tensor(timesteps).float().cpu())
        return DiscreteDenoiser(self.network, self.schedule, self.prediction, self.network_dtype,
                                variance_type=self.variance_type, timesteps=table)

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def noise_input(self, c_noise: torch.Tensor) -> torch.Tensor:
        if self.timesteps is None:
            return self.schedule.sigma_to_t(c_noise).float()
        if c_noise.device not in self._timesteps_on:  # a pageable copy would sync the host with the GPU every step
            self._timesteps_on[c_noise.device] = tuple(v.to(c_noise.device) for v in self.timesteps)
        sigmas, timesteps = self._timesteps_on[c_noise.device]
        t = self.schedule.log_sigma_to_t(c_noise)
        if not len(sigmas) or _BETWEEN_PLAN_SIGMAS.get():
            return t.float()
        hit = c_noise.float()[:, None] == sigmas[None, :]  # (b, plan sigmas): exactly a plan sigma
        return torch.where(hit.any(1), timesteps[hit.int().argmax(1)].to(t.dtype), t).float()


class EDMDenoiser(Denoiser):
    """A network with EDM preconditioning: `network(x * c_in, log(sigma) / 4, **cond)` (Karras et al. 2022, Table 1).

    sigma_min / sigma_max are the model's sampling range (as `DiscreteDenoiser` has its training sigmas' range).
    """

    def __init__(self, network, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 dtype: torch.dtype | None = None):
        super().__init__(network, EDMScaling(sigma_data), dtype)
        self.sigma_data = sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max


def build_denoiser(network, schedule_config: ScheduleConfig, dtype: torch.dtype | None = None) -> Denoiser:
    """The denoiser of a model's schedule: EDM preconditioning for "edm", else its discrete timesteps (eps / v / x0).
    `dtype`: the network's precision (None: x's)."""
    c = schedule_config
    if c.is_edm:
        return EDMDenoiser(network, c.sigma_data, c.sigma_min, c.sigma_max, dtype)
    return DiscreteDenoiser(network, DiscreteSchedule.from_config(c), c.prediction_type, dtype,
                            variance_type=c.variance_type)

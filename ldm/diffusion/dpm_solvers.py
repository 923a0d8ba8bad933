"""The DPM-Solver family beyond 2M: the samplers A1111 and ComfyUI users know by k-diffusion's names.

Same contract as `samplers.py`: `sample_X(denoiser, x, sigmas, cond=None, *, generator=None, callback=None) -> x`
in variance-exploding coordinates, with lambda = -log sigma the log-SNR time of Lu et al. The noisy ones take
`noise_sampler(sigma, sigma_next) -> a standard normal like x`: by default a fresh draw from the generator per call
(the stream diffusers draws), and for DPM++ SDE, whose two noises per step overlap, a `BrownianNoise` path.
"""
from __future__ import annotations

import math

import torch

from ldm.diffusion.brownian import BrownianNoise
from ldm.diffusion.denoiser import between_plan_sigmas
from ldm.diffusion.samplers import (
    _ancestral,
    _call,
    _churned,
    _data_prediction_loop,
    _euler_to,
    _noise,
    ancestral_step,
)


def _call_between(denoiser, x: torch.Tensor, sigma: float, cond) -> torch.Tensor:
    """A step's inner (midpoint) evaluation: the network's timestep is the log-sigma one, never a plan's (denoiser.py)."""
    with between_plan_sigmas():
        return _call(denoiser, x, sigma, cond)


def _dpm_solver_2(denoiser, cond):
    """`step(x, denoised, sigma, sigma_to)`: DPM-Solver-2 (Lu et al. 2022, Alg. 1, r1 = 1/2), Euler to sigma 0.

    With alpha = 1 (VE) the eps-form update is x + (sigma_to - sigma) eps(u, sigma_mid), u = x + (sigma_mid - sigma) d,
    and the midpoint in lambda is the geometric mean of the two sigmas (Karras et al. 2022's "DPM2").
    """

    def step(x, denoised, sigma, sigma_to):
        if sigma_to == 0:
            return _euler_to(x, denoised, sigma, sigma_to)
        sigma_mid = math.sqrt(sigma * sigma_to)
        x_mid = _euler_to(x, denoised, sigma, sigma_mid)
        d_mid = (x_mid - _call_between(denoiser, x_mid, sigma_mid, cond)) / sigma_mid
        return x + d_mid * (sigma_to - sigma)

    return step


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 steps with EDM's optional churn (Karras et al. 2022, Alg. 2 with a midpoint in log sigma);
    Euler on the step to 0. Two denoiser calls per step."""
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churned(denoiser, x, sigmas, cond, _dpm_solver_2(denoiser, cond), churn, generator, callback,
                    disable_progress)


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    """A DPM-Solver-2 step down to sigma_down, then fresh noise of std sigma_up (`ancestral_step`)."""
    return _ancestral(denoiser, x, sigmas, cond, eta, s_noise, generator, callback, disable_progress,
                      _dpm_solver_2(denoiser, cond), noise_sampler)


def _exp_step(x, denoised, sigma, sigma_to):
    """The first-order data-prediction step (DPM-Solver++(1) = DDIM): x_to = (s_to/s) x + (1 - s_to/s) D, in VE."""
    ratio = sigma_to / sigma
    return ratio * x + (1 - ratio) * denoised


def _dpmpp_2s(denoiser, cond):
    """`step(x, denoised, sigma, sigma_to)`: DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2: the data prediction
    at the lambda-midpoint drives the whole step); Euler to sigma 0."""

    def step(x, denoised, sigma, sigma_to):
        if sigma_to == 0:
            return _euler_to(x, denoised, sigma, sigma_to)
        sigma_mid = math.sqrt(sigma * sigma_to)  # lambda + h / 2
        x_mid = _exp_step(x, denoised, sigma, sigma_mid)
        return _exp_step(x, _call_between(denoiser, x_mid, sigma_mid, cond), sigma, sigma_to)

    return step


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, cond=None, *, generator=None, callback=None,
                              disable_progress=True, eta=1.0, s_noise=1.0, noise_sampler=None):
    """A DPM-Solver++(2S) step to sigma_down, then fresh noise of std sigma_up (`ancestral_step`)."""
    return _ancestral(denoiser, x, sigmas, cond, eta, s_noise, generator, callback, disable_progress,
                      _dpmpp_2s(denoiser, cond), noise_sampler)


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                     eta=1.0, s_noise=1.0, r=0.5, noise_sampler=None):
    """DPM-Solver++ SDE, k-diffusion's "DPM++ SDE": a stochastic DPM-Solver++(2S) (Lu et al. 2022b) whose two stages
    are each an ancestral step (`ancestral_step`, eta) from sigma, the first to the lambda-point h * r of the step.

    Its two noises must be increments of one Brownian path over sigma (see `brownian.py`); the step to 0 is Euler.
    """
    if not 0 < r < 1:
        raise ValueError(f"r must lie in (0, 1), got {r}")
    noise_sampler = noise_sampler or BrownianNoise(x, generator)

    def step(x, denoised, sigma, sigma_next, history):
        sigma_mid = sigma ** (1 - r) * sigma_next**r  # lambda + r h
        sigma_down, sigma_up = ancestral_step(sigma, sigma_mid, eta)  # stage 1: to the midpoint
        x_mid = _exp_step(x, denoised, sigma, sigma_down)
        if sigma_up > 0:
            x_mid = x_mid + noise_sampler(sigma, sigma_mid) * s_noise * sigma_up
        denoised_mid = _call_between(denoiser, x_mid, sigma_mid, cond)
        fac = 1 / (2 * r)  # stage 2: the whole step on the first-order-corrected data prediction
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = _exp_step(x, (1 - fac) * denoised + fac * denoised_mid, sigma, sigma_down)
        if sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
        return x

    return _data_prediction_loop(denoiser, x, sigmas, cond, step, callback, disable_progress)


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                        eta=1.0, s_noise=1.0, noise_sampler=None, first_order=None):
    """SDE-DPM-Solver++(3M), k-diffusion's "DPM++ 3M SDE" (Lu et al. 2022b, Sec. 5 and App. B's SDE variant).

    With c = 1 + eta, each step integrates dx/dlambda = -c (x - D) exactly for D a polynomial in lambda through the
    last three outputs (phi_2 = 1 - (1 - e^{-ch}) / ch and phi_3 = phi_2 / ch - 1/2 are DPM-Solver's multistep
    coefficients), then adds the Ornstein-Uhlenbeck noise sigma_next sqrt(1 - e^{-2 eta h}); orders 1 and 2 on the
    first two steps, the denoised estimate on the step to 0, first order on the steps `first_order` marks. eta = 0 is the
    ODE solver DPM-Solver++(3M).
    """
    noise_sampler = noise_sampler or (lambda sigma, sigma_next: _noise(x, generator))  # a fresh draw per step

    def step(x, denoised, sigma, sigma_next, history):
        h = math.log(sigma) - math.log(sigma_next)
        ch = (1 + eta) * h
        x = math.exp(-ch) * x - math.expm1(-ch) * denoised  # (sigma_next / sigma) e^{-eta h} x + (1 - e^{-ch}) D
        phi_2 = math.expm1(-ch) / ch + 1
        if len(history) == 2:
            (denoised_1, h_1), (denoised_2, h_2) = history
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / ch - 0.5) * d2
        elif history:
            denoised_1, h_1 = history[0]
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
        return x

    return _data_prediction_loop(denoiser, x, sigmas, cond, step, callback, disable_progress, first_order)

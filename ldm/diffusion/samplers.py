"""Samplers: plain functions `sample_X(denoiser, x, sigmas, cond=None, *, generator=None, callback=None) -> x`.

x = x0 + sigma * noise (variance-exploding coordinates); `x` starts at noise level sigmas[0] and the samplers walk the
decreasing `sigmas`, which end with 0 or a small final sigma. `callback` receives a dict with x, i, sigma,
sigma_hat and denoised after each step. Noise is `torch.randn(..., generator=generator)` drawn on the generator's
device (the same stream diffusers draws), then moved to x's device.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import trange

from ldm.diffusion.learned_variance import interpolate_log_variance, log_variance_bounds, posterior
from ldm.errors import LdmError
from ldm.runtime import randn


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    """Fresh noise like `x` from a torch.Generator, or per image from `ldm.runtime.ImageGenerators`."""
    if generator is None:
        return torch.randn_like(x)
    return randn(x.shape, generator, x.dtype).to(x.device)


def _sigma_list(sigmas) -> list[float]:
    return sigmas.tolist() if torch.is_tensor(sigmas) else [float(s) for s in sigmas]


def _sigma_in(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """sigma as a (b,) tensor: float32 (float64 for float64 x) whatever the sample's precision."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), sigma, device=x.device, dtype=dtype)


def _call(denoiser, x: torch.Tensor, sigma: float, cond) -> torch.Tensor:
    return denoiser(x, _sigma_in(x, sigma), cond)


def _report(callback: Callable | None, x, i, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): the deterministic target and the fresh-noise std of an ancestral step.

    With eta = 1 this is the DDPM posterior q(x_prev | x, x0) (Ho et al. 2020, eq. 7); with eta it is DDIM's
    sigma_t(eta) (Song et al. 2021, eq. 16), both in VE units.
    """
    if eta == 0 or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def _churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, generator):
    """EDM Alg. 2 lines 4-6: raise the noise level to sigma_hat = (1 + gamma) sigma by adding fresh noise.

    With churn on, every step draws its noise, also outside [s_tmin, s_tmax] where it is not used, as k-diffusion
    does: a seed then gives k-diffusion's sample whatever the churn window. (diffusers' EulerDiscreteScheduler churns
    differently: it adds the noise after the network call and reuses that call's eps at sigma_hat.)
    """
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    noise = _noise(x, generator) if s_churn > 0 else None
    if gamma > 0:
        x = x + noise * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def _euler_to(x, denoised, sigma, sigma_to):
    """One Euler step of dx/dsigma = (x - D) / sigma from sigma to sigma_to."""
    return x + (x - denoised) / sigma * (sigma_to - sigma)


def _ddim_to(x, denoised, sigma, sigma_to):
    """The same step written as DDIM's x0 + sigma_to * eps (Song et al. 2021, eq. 12): no cancellation of x against
    the update, which at the cosine schedule's sigma_max (20291, DeepFloyd IF) cost `_euler_to` 3 of float32's 7
    digits (1.5e-4 of the image, where diffusers' VP arithmetic keeps 1e-7)."""
    return denoised + (x - denoised) * (sigma_to / sigma)


def _churned(denoiser, x, sigmas, cond, step, churn, generator, callback, disable_progress):
    """EDM's Alg. 2 loop: churn to sigma_hat, denoise, then `step(x, denoised, sigma_hat, sigma_next)`."""
    sigmas = _sigma_list(sigmas)
    n = len(sigmas) - 1
    for i in trange(n, disable=disable_progress):
        x, sigma_hat = _churn(x, sigmas[i], n, *churn, generator)  # lines 4-6
        denoised = _call(denoiser, x, sigma_hat, cond)  # line 7
        x = step(x, denoised, sigma_hat, sigmas[i + 1])
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
    return x


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churned(denoiser, x, sigmas, cond, _euler_to, churn, generator, callback, disable_progress)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's 2nd-order method, with optional churn (Karras et al. 2022, Alg. 1 and 2); Euler on the step to 0."""

    def heun_step(x, denoised, sigma_hat, sigma_next):
        x_next = _euler_to(x, denoised, sigma_hat, sigma_next)  # line 8
        if sigma_next == 0:
            return x_next
        d = (x - denoised) / sigma_hat  # lines 9-11: second-order correction
        d_next = (x_next - _call(denoiser, x_next, sigma_next, cond)) / sigma_next
        return x + (d + d_next) / 2 * (sigma_next - sigma_hat)

    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churned(denoiser, x, sigmas, cond, heun_step, churn, generator, callback, disable_progress)


def _ancestral(denoiser, x, sigmas, cond, eta, s_noise, generator, callback, disable_progress, step=_euler_to,
               noise_sampler=None):
    """`step(x, denoised, sigma, sigma_down)`, then noise of std sigma_up (`ancestral_step`): fresh draws from the
    generator, or `noise_sampler(sigma, sigma_next)`.

    With eta > 0 every step to a sigma_next > 0 draws its noise, also a step of zero length (sigma_next = sigma, whose
    sigma_up is 0), as k-diffusion does: a schedule that repeats a sigma then keeps k-diffusion's noise on the later
    steps (drawing only where sigma_up > 0 shifted them all, 0.67 to 1.0 relative)."""
    sigmas = _sigma_list(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable_progress):
        denoised = _call(denoiser, x, sigmas[i], cond)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = step(x, denoised, sigmas[i], sigma_down)
        if eta > 0 and sigmas[i + 1] > 0:
            noise = _noise(x, generator) if noise_sampler is None else noise_sampler(sigmas[i], sigmas[i + 1])
            x = x + noise * s_noise * sigma_up
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    """Euler step down to sigma_down, then fresh noise of std sigma_up (k-diffusion's ancestral sampler); the noise
    is drawn from `generator`, or taken from `noise_sampler(sigma, sigma_next)`."""
    return _ancestral(denoiser, x, sigmas, cond, eta, s_noise, generator, callback, disable_progress,
                      noise_sampler=noise_sampler)


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True, eta=0.0,
                sigmas_next=None):
    """DDIM (Song et al. 2021, eq. 12): x_prev = x0 + sqrt(sigma_prev^2 - sigma_t(eta)^2) eps + sigma_t(eta) z.

    In VE coordinates DDIM with eta = 0 is exactly Euler's method; a nonzero final sigma (DDIM's alpha_bar_0 when
    set_alpha_to_one is false) is simply the last noise level reached. `sigmas_next[i]`, when given, is the level
    step i moves to before its VP sample is read as being at sigmas[i + 1] (diffusers' DDIM with "linspace" or
    uneven "trailing" spacing steps to t - T // steps, not to the next timestep; `sampling_plan` provides it).
    """
    sigmas = _sigma_list(sigmas)
    if sigmas_next is None:
        return _ancestral(denoiser, x, sigmas, cond, eta, 1.0, generator, callback, disable_progress, step=_ddim_to)
    sigmas_next = _sigma_list(sigmas_next)
    for i in trange(len(sigmas) - 1, disable=disable_progress):
        denoised = _call(denoiser, x, sigmas[i], cond)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas_next[i], eta)
        x = _ddim_to(x, denoised, sigmas[i], sigma_down)
        if sigma_up > 0:
            x = x + _noise(x, generator) * sigma_up
        # The VP sample at sigmas_next[i] is taken to be at sigmas[i + 1]: rescale x_ve = x_vp sqrt(1 + sigma^2).
        x = x * math.sqrt((1 + sigmas[i + 1] ** 2) / (1 + sigmas_next[i] ** 2))
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                noised_steps=None):
    """Ancestral sampling from p(x_prev | x) = q(x_prev | x, x0_hat) (Ho et al. 2020, Alg. 2, in VE coordinates).

    The variance is the posterior's beta_tilde, or the learned interpolation between beta and beta_tilde
    (Nichol & Dhariwal 2021, eq. 15) when the denoiser returns a variance output from `forward_with_variance`. A
    denoiser whose `variance_type` is "learned" (diffusers' DDPMScheduler: the output is the variance of x_prev itself,
    in VP units, not an interpolation) steps with that variance; a negative one is refused (diffusers' image is NaN).
    Noise is added after every step to a sigma > 0; `noised_steps[i]` (the plan's, where the last timestep is not 0)
    says which steps add it instead: diffusers' DDPMScheduler adds it after every step from a timestep t > 0, the
    last one too, whose learned variance interpolates between beta_t and the floored beta_tilde = 0.
    """
    sigmas = _sigma_list(sigmas)
    with_variance = getattr(denoiser, "forward_with_variance", None)
    raw_variance = getattr(denoiser, "variance_type", None) == "learned"
    for i in trange(len(sigmas) - 1, disable=disable_progress):
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        s_in = _sigma_in(x, sigma)
        if with_variance is not None:
            denoised, v = with_variance(x, s_in, cond)
        else:
            denoised, v = denoiser(x, s_in, cond), None
        x, variance = posterior(denoised, x, sigma, sigma_prev)  # Alg. 2 line 4: the mean and beta_tilde of eq. 7
        if (sigma_prev > 0) if noised_steps is None else bool(noised_steps[i]):
            if v is None:
                std = math.sqrt(variance)
            elif raw_variance:  # x_prev's VP variance: x_ve = x_vp * sqrt(1 + sigma^2) scales it by 1 + sigma_prev^2
                if bool((v < 0).any()):
                    raise LdmError(f"DDPM step {i + 1}: the network's variance output has negative values, and the "
                                   "scheduler's variance_type 'learned' takes it as the variance itself (diffusers' "
                                   "DDPMScheduler makes NaN there). A model trained for the interpolation between "
                                   "beta and beta_tilde needs variance_type 'learned_range'")
                std = (v.float() * (1 + sigma_prev**2)).sqrt().to(x.dtype)
            else:
                bounds = log_variance_bounds(*torch.tensor([sigma, sigma_prev], dtype=torch.float64))
                log_var = interpolate_log_variance(v.float(), *(float(b) for b in bounds))
                std = (0.5 * log_var).exp().to(x.dtype)
            x = x + std * _noise(x, generator)
        _report(callback, x, i, sigma, sigma, denoised)
    return x


def _data_prediction_loop(denoiser, x, sigmas, cond, step, callback, disable_progress, first_order=None):
    """Denoise, then `step(x, denoised, sigma, sigma_next, history)`, except on the step to sigma 0, which lands on the
    denoised estimate, and a step of zero length, which leaves x. `history`: the earlier steps' (denoised, h = log sigma
    - log sigma_next), newest first; empty on the steps `first_order[i]` marks (a plan's lower-order final step)."""
    sigmas = _sigma_list(sigmas)
    history = []
    for i in trange(len(sigmas) - 1, disable=disable_progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _call(denoiser, x, sigma, cond)
        if sigma_next == 0:
            x = denoised
        elif sigma_next == sigma:  # a repeated sigma (Karras sigmas ending at sigma_min twice): nothing to integrate,
            _report(callback, x, i, sigma, sigma, denoised)  # and no new point in lambda for the history: the next
            continue  # step's output is at this lambda. (Recording h = 0 divided by zero on the next step.)
        else:
            forced = first_order is not None and bool(first_order[i])
            x = step(x, denoised, sigma, sigma_next, [] if forced else history)
        h = math.log(sigma) - math.log(sigma_next) if sigma_next > 0 else math.inf
        history = [(denoised, h)] + history[:1]
        _report(callback, x, i, sigma, sigma, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                    first_order=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in log-SNR time lambda = -log sigma; first order on the first step,
    on the step to sigma = 0 (diffusers' lower_order_final) and on the steps `first_order` marks."""

    def step(x, denoised, sigma, sigma_next, history):
        h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
        if not history:
            d = denoised  # DPM-Solver++(1) = DDIM
        else:
            old_denoised, h_last = history[0]
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        return (sigma_next / sigma) * x - math.expm1(-h) * d

    return _data_prediction_loop(denoiser, x, sigmas, cond, step, callback, disable_progress, first_order)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                        eta=1.0, s_noise=1.0, solver_type="midpoint", noise_sampler=None, first_order=None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, Appendix; diffusers' "sde-dpmsolver++"); eta = 0 gives the ODE solver.
    The noise is drawn from `generator`, or taken from `noise_sampler(sigma, sigma_next)`; first order on the first
    step and the steps `first_order` marks."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")

    def step(x, denoised, sigma, sigma_next, history):
        h = math.log(sigma) - math.log(sigma_next)
        eta_h = eta * h
        phi = -math.expm1(-h - eta_h)  # 1 - e^{-(1 + eta) h}
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + phi * denoised
        if history:
            old_denoised, h_last = history[0]
            r = h_last / h
            if solver_type == "midpoint":
                x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            else:
                x = x + (1 - phi / (h + eta_h)) * (1 / r) * (denoised - old_denoised)
        if eta:
            noise = _noise(x, generator) if noise_sampler is None else noise_sampler(sigma, sigma_next)
            x = x + noise * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        return x

    return _data_prediction_loop(denoiser, x, sigmas, cond, step, callback, disable_progress, first_order)


def _lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """The integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node i - j (nodes i, i-1, ...)."""
    basis = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            basis *= np.poly1d([1.0, -sigmas[i - k]]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()  # a polynomial: integrated exactly (diffusers and k-diffusion use quadrature)
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True, order=4):
    """Linear multistep (explicit Adams-Bashforth) on the probability-flow ODE dx/dsigma = (x - D) / sigma.

    The derivative is extrapolated by the Lagrange polynomial in sigma through the last `order` derivatives and
    integrated over the step (Hairer, Norsett & Wanner 1993, Sec. III.1; the diffusion use of PNDM, Liu et al. 2022
    and k-diffusion's `sample_lms`); the first steps use the derivatives there are.
    """
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    sigmas = _sigma_list(sigmas)
    derivatives = []
    for i in trange(len(sigmas) - 1, disable=disable_progress):
        denoised = _call(denoiser, x, sigmas[i], cond)
        derivatives = ([(x - denoised) / sigmas[i]] + derivatives)[:order]  # newest first
        current = len(derivatives)
        x = x + sum(_lms_coefficient(sigmas, i, current, j) * d for j, d in enumerate(derivatives))
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
    return x


def _unipc_update(x, sigmas: list[float], s: int, m0, m1=None, m_t=None):
    """One UniPC step from sigmas[s] to sigmas[s + 1] with B(h) = e^h - 1 ("bh2"), in data prediction.

    In VE coordinates the data-prediction update of Zhao et al. 2023 (Sec. 3, UniC-p and UniP-p) reads
    x_t = (sigma_t / sigma_s) x + (1 - sigma_t / sigma_s) (m0 + sum_k rho_k D_k), with lambda = -log sigma,
    h = lambda_t - lambda_s, D_1 = (m1 - m0) / r_1 for the previous output m1 at r_1 = (lambda_1 - lambda_s) / h.
    Predictor (UniP, m_t None): rho_1 = 1/2, which makes UniP-2 DPM-Solver++(2M). Corrector (UniC, m_t the output
    at sigma_t): D_t = m_t - m0 and the rho solve R rho = b, R_ik = r_k^(i-1) (rho_t = 1/2 at order 1).
    """
    sigma_s, sigma_t = sigmas[s], sigmas[s + 1]
    h = math.log(sigma_s) - math.log(sigma_t) if sigma_t > 0 else math.inf
    phi = -math.expm1(-h)  # 1 - sigma_t / sigma_s
    if m1 is not None:
        r1 = (math.log(sigma_s) - math.log(sigmas[s - 1])) / h
        d1 = (m1 - m0) / r1
    if m_t is None:
        update = m0 if m1 is None else m0 + 0.5 * d1
    elif m1 is None:
        update = m0 + 0.5 * (m_t - m0)
    else:
        hh = -h  # data prediction runs on -h; b_k = hh phi_k(hh) k! / B(h), phi_k the exponential integrals
        b_h = math.expm1(hh)
        g1 = b_h / hh - 1
        g2 = g1 / hh - 0.5
        b1, b2 = g1 / b_h, 2 * g2 / b_h
        rho_1 = (b1 - b2) / (1 - r1)  # solves [[1, 1], [r1, 1]] (rho_1, rho_t) = (b1, b2)
        rho_t = b1 - rho_1
        update = m0 + rho_1 * d1 + rho_t * (m_t - m0)
    return (sigma_t / sigma_s) * x + phi * update


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                 first_order=None):
    """UniPC multistep, order 2, bh2 (Zhao et al. 2023): each new denoiser output first corrects the step just taken
    (UniC, no extra evaluation), then predicts the next (UniP); first order on the first and last steps and on the
    steps `first_order` marks."""
    sigmas = _sigma_list(sigmas)
    n = len(sigmas) - 1
    outputs, x_prev, order_prev = [], None, 0  # the last two outputs; where and at what order the last step began
    for i in trange(n, disable=disable_progress):
        denoised = _call(denoiser, x, sigmas[i], cond)
        if order_prev:  # UniC-p on the step from sigmas[i - 1]
            x = _unipc_update(x_prev, sigmas, i - 1, outputs[-1], outputs[-2] if order_prev == 2 else None, denoised)
        outputs = (outputs + [denoised])[-2:]
        order = min(2, i + 1, n - i)  # warm-up, and diffusers' lower_order_final on the last step
        if first_order is not None and bool(first_order[i]):
            order = 1
        x_prev, order_prev = x, order
        x = _unipc_update(x, sigmas, i, denoised, outputs[0] if order == 2 else None)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
    return x

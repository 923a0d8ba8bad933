"""Learned reverse-process variance and the variational bound term (Improved DDPM, Nichol & Dhariwal 2021).

Everything is written for one step sigma -> sigma_prev (sigma_prev < sigma) in variance-exploding coordinates
x = x0 + sigma * noise. The VP quantities of the paper map over through x_vp = x / sqrt(1 + sigma^2): a VP variance at
step t-1 is the VE variance divided by (1 + sigma_prev^2), and KL divergences are unchanged by that common scaling.
"""
from __future__ import annotations

import math

import torch

LOG_VARIANCE_FLOOR = math.log(1e-20)  # diffusers clamps the posterior variance at 1e-20 before taking its log


def posterior(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_prev: torch.Tensor):
    """Mean and variance of q(x_prev | x, x0) (Ho et al. 2020, eqs. 6-7) in VE form; sigmas broadcastable."""
    ratio = sigma_prev**2 / sigma**2
    mean = x0 + ratio * (x - x0)
    variance = sigma_prev**2 * (sigma**2 - sigma_prev**2) / sigma**2  # beta_tilde_t in VE units
    return mean, variance


def log_variance_bounds(sigma: torch.Tensor, sigma_prev: torch.Tensor):
    """(log beta_t, log beta_tilde_t) of the step in VE units: the ends of the learned interpolation (eq. 15)."""
    beta = (sigma**2 - sigma_prev**2) * (1 + sigma_prev**2) / (1 + sigma**2)
    beta_tilde = sigma_prev**2 * (sigma**2 - sigma_prev**2) / sigma**2
    return beta.log(), beta_tilde.log().clamp(min=LOG_VARIANCE_FLOOR)


def interpolate_log_variance(v: torch.Tensor, log_beta: torch.Tensor, log_beta_tilde: torch.Tensor) -> torch.Tensor:
    """Sigma_theta = exp(v' log beta + (1 - v') log beta_tilde), v' = (v + 1) / 2 for v in [-1, 1] (eq. 15)."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) for data in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)) (Ho et al. 2020, eq. 13)."""
    centered = x - mean
    inv_std = (-log_scale).exp()
    cdf_plus = _standard_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_minus = _standard_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()  # the bin reaching to -inf (x = -1)
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()  # the bin reaching to +inf (x = 1)
    log_bin = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def vlb_term(
    x0: torch.Tensor,  # clean data, b c h w
    x: torch.Tensor,  # noised data x0 + sigma * noise
    x0_pred: torch.Tensor,  # the model's x0 (pass it detached for the hybrid loss: stop-grad on the mean)
    v: torch.Tensor,  # the model's variance output in [-1, 1]
    sigma: torch.Tensor,  # (b,)
    sigma_prev: torch.Tensor,  # (b,), 0 at the first training timestep
    log_beta_tilde_first: float,  # log beta_tilde of the step 1 -> 0 (Improved DDPM's clipped value at t = 0)
) -> torch.Tensor:
    """Per-sample L_t in bits per dimension: KL(q || p_theta) for t > 0, the decoder NLL at t = 0 (eqs. 4-5, 13)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    s, sp = sigma.reshape(shape).to(x.dtype), sigma_prev.reshape(shape).to(x.dtype)
    first = sp == 0
    log_beta, log_beta_tilde = log_variance_bounds(s, sp)
    log_beta_tilde = torch.where(first, torch.full_like(log_beta_tilde, log_beta_tilde_first), log_beta_tilde)
    model_log_var = interpolate_log_variance(v, log_beta, log_beta_tilde)
    model_mean, _ = posterior(x0_pred, x, s, sp)
    _, true_var = posterior(x0, x, s, sp)
    # The means differ by (1 - sigma_prev^2 / sigma^2)(x0_pred - x0): pass that difference, free of cancellation.
    # The VP variances are the VE ones divided by (1 + sigma_prev^2): the KL is the same in either coordinates.
    mean_gap = (1 - sp**2 / s**2) * (x0_pred - x0)
    kl = normal_kl(torch.zeros_like(mean_gap), true_var.clamp(min=1e-20).log(), mean_gap, model_log_var)
    kl = kl.flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    nll = nll.flatten(1).mean(1) / math.log(2.0)
    return torch.where(first.flatten(), nll, kl)


def first_step_log_beta_tilde(alphas_cumprod: torch.Tensor) -> float:
    """log of beta_tilde at t = 1, which Improved DDPM uses in place of the zero posterior variance at t = 0."""
    a0, a1 = alphas_cumprod[0].double(), alphas_cumprod[1].double()
    beta1 = 1 - a1 / a0
    return float((beta1 * (1 - a0) / (1 - a1)).log())

"""Training losses: sigma samplers, loss weightings and the denoising loss (EDM `training/loss.py` in spirit).

Every loss is a weighted x0 error, weighting(sigma) * mean ||D(x0 + sigma n, sigma) - x0||^2; the weighting turns it
into the usual objective of each parameterisation (x = x0 + sigma * noise, SNR = 1 / sigma^2).
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.diffusion.denoiser import append_dims, batch_sigma
from ldm.diffusion.learned_variance import first_step_log_beta_tilde, vlb_term
from ldm.diffusion.schedules import DiscreteSchedule


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class DiscreteSigmaSampler:
    """sigma_t for t uniform over the training timesteps (Ho et al. 2020, Alg. 1 line 3)."""

    def __init__(self, schedule: DiscreteSchedule):
        self.schedule = schedule

    def __call__(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        t = torch.randint(0, self.schedule.num_timesteps, (n,), generator=generator,
                          device=generator.device if generator is not None else "cpu")
        return self.schedule.sigmas[t.cpu()].to(device)


class LogNormalSigmaSampler:
    """ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1: P_mean = -1.2, P_std = 1.2)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        z = torch.randn(n, generator=generator, device=generator.device if generator is not None else "cpu")
        return (self.p_mean + self.p_std * z).exp().to(device)


def eps_weighting(sigma: torch.Tensor) -> torch.Tensor:
    """L_simple (Ho et al. 2020, Alg. 1): ||eps - eps_hat||^2 = ||x0 - x0_hat||^2 / sigma^2."""
    return sigma**-2


def v_weighting(sigma: torch.Tensor) -> torch.Tensor:
    """v-MSE (Salimans & Ho 2022): ||v - v_hat||^2 = (1 + sigma^2) / sigma^2 ||x0 - x0_hat||^2."""
    return (sigma**2 + 1) / sigma**2


def x0_weighting(sigma: torch.Tensor) -> torch.Tensor:
    """Plain x0 MSE."""
    return torch.ones_like(sigma)


class EDMWeighting:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, Table 1)."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class MinSNRWeighting:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) times the x0 MSE.

    This is the paper's min(SNR, gamma) / SNR on the eps MSE and min(SNR, gamma) / (SNR + 1) on the v MSE alike
    (eps MSE = SNR x0 MSE, v MSE = (SNR + 1) x0 MSE), and it stays finite (0) at SNR = 0 (sigma = inf).
    """

    def __init__(self, gamma: float = 5.0):
        self.gamma = gamma

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**-2).clamp(max=self.gamma)


WEIGHTINGS: dict[str, Callable[[], Callable]] = {
    "eps": lambda: eps_weighting,
    "v": lambda: v_weighting,
    "x0": lambda: x0_weighting,
    "edm": EDMWeighting,
    "min_snr": MinSNRWeighting,
}


def get_weighting(weighting: str | Callable, **kwargs) -> Callable:
    """A weighting by name (eps, v, x0, edm, min_snr; kwargs such as sigma_data or gamma) or the callable itself."""
    if callable(weighting):
        return weighting
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[weighting](**kwargs)


def add_noise(x0, sigma, noise=None, offset_noise: float = 0.0, generator=None):
    """(x0 + sigma * noise, noise); offset noise adds offset * randn(b, c, 1, 1) to the noise (Guttenberg 2023)."""
    if noise is None:
        noise = _randn(x0.shape, x0, generator)
    if offset_noise:
        noise = noise + offset_noise * _randn(x0.shape[:2] + (1,) * (x0.ndim - 2), x0, generator)
    return x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise, noise


def denoising_loss(denoiser, x0: torch.Tensor, sigma, cond=None, weighting: str | Callable = "eps",
                   noise=None, offset_noise: float = 0.0, generator=None) -> torch.Tensor:
    """Per-sample loss (b,): weighting(sigma) * mean over c h w of (D(x0 + sigma n, sigma, cond) - x0)^2."""
    sigma = batch_sigma(sigma, x0)
    x, _ = add_noise(x0, sigma, noise, offset_noise, generator)
    x0_hat = denoiser(x, sigma, cond)
    return get_weighting(weighting)(sigma) * (x0_hat - x0).float().pow(2).flatten(1).mean(1)


def hybrid_loss(denoiser, x0: torch.Tensor, sigma, cond=None, *, weighting: str | Callable = "eps",
                vlb_weight: float = 0.001, noise=None, offset_noise: float = 0.0, generator=None) -> torch.Tensor:
    """L_hybrid = L_simple + lambda L_vlb per sample (Nichol & Dhariwal 2021, Sec. 3.1), lambda = 0.001.

    `denoiser` is a `DiscreteDenoiser` over a learned-variance network and sigma must be training sigmas
    (`DiscreteSigmaSampler`). L_vlb = T * L_t, estimated at the sampled t, with a stop-gradient on the mean so that
    it trains only the variance.
    """
    schedule: DiscreteSchedule = denoiser.schedule
    sigma = batch_sigma(sigma, x0)
    t = schedule.sigma_to_t(sigma)
    if not bool((t == t.round()).all()):
        raise ValueError("hybrid_loss needs sigmas of the training timesteps (use DiscreteSigmaSampler)")
    x, _ = add_noise(x0, sigma, noise, offset_noise, generator)
    x0_hat, v = denoiser.forward_with_variance(x, sigma, cond)
    if v is None:
        raise ValueError("hybrid_loss needs a learned-variance network (twice the input channels out)")
    simple = get_weighting(weighting)(sigma) * (x0_hat - x0).float().pow(2).flatten(1).mean(1)
    sigma_prev = schedule.sigma_prev(t).to(sigma.dtype)
    log_first = first_step_log_beta_tilde(schedule.alphas_cumprod)
    vlb = vlb_term(x0.float(), x.float(), x0_hat.detach().float(), v.float(), sigma, sigma_prev, log_first)
    return simple + vlb_weight * schedule.num_timesteps * vlb

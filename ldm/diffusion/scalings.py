"""Parameterisations: sigma -> (c_skip, c_out, c_in, c_noise), with D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

Karras et al. 2022 (EDM), Table 1. For the discrete (VP-trained) scalings c_noise is sigma itself: the denoiser maps it
to the network's timestep. x = x0 + sigma * noise throughout (variance-exploding coordinates); the VP network input
x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise equals c_in x with c_in = 1 / sqrt(1 + sigma^2).
"""
from __future__ import annotations

import torch

from ldm.diffusion.schedules import canonical_prediction
from ldm.errors import ConfigError

Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class EpsScaling:
    """The network predicts the noise: x0 = x - sigma * eps (Ho et al. 2020)."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_in = 1 / (sigma**2 + 1).sqrt()
        return torch.ones_like(sigma), -sigma, c_in, sigma


class VScaling:
    """v = alpha eps - sigma_vp x0 (Salimans & Ho 2022, Sec. 4): x0 = x / (1 + s^2) - s v / sqrt(1 + s^2)."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / (sigma**2 + 1).sqrt()
        c_in = 1 / (sigma**2 + 1).sqrt()
        return c_skip, c_out, c_in, sigma


class X0Scaling:
    """The network predicts the clean sample directly."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_in = 1 / (sigma**2 + 1).sqrt()
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, sigma


class EDMScaling:
    """EDM preconditioning (Karras et al. 2022, Table 1): unit-variance input and target, c_noise = ln(sigma) / 4."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


_BY_PREDICTION = {"epsilon": EpsScaling, "v_prediction": VScaling, "sample": X0Scaling}


def scaling_for(prediction: str):
    """The scaling of a discrete model's prediction type (diffusers' names epsilon / v_prediction / sample)."""
    try:
        return _BY_PREDICTION[canonical_prediction(prediction)]()
    except (KeyError, ConfigError):
        raise ConfigError(f"unknown prediction type {prediction!r}; use epsilon, v_prediction or sample") from None

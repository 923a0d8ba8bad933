"""Samplers on Gaussian data, whose exact denoiser and probability-flow ODE solution are known in closed form."""
import math

import pytest
import torch
from helpers import MU, S, convergence_slope, gaussian_denoiser

from ldm.diffusion import (
    SAMPLERS,
    DiscreteDenoiser,
    DiscreteSchedule,
    EDMDenoiser,
    EDMScaling,
    ScheduleConfig,
    VScaling,
    karras_sigmas,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_heun,
)

# dpm_adaptive: each image (here a single number) sizes its own steps; k-diffusion's rtol 0.05 leaves 6% in its std
SAMPLER_KWARGS = {"heun": {"s_churn": 20.0}, "ddim": {"eta": 0.5}, "dpm_adaptive": {"rtol": 0.01, "atol": 0.001}}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samples_have_the_data_distribution(name):
    """4000 samples from each sampler have mean mu and std s (statistical tolerance ~4 standard errors)."""
    sigmas = karras_sigmas(250, 0.002, 80.0)  # enough steps that the first-order samplers' bias is < 0.01
    generator = torch.Generator().manual_seed(1)
    x = MU + math.sqrt(S**2 + 80.0**2) * torch.randn(4000, 1, generator=generator, dtype=torch.float64)
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas, None, generator=generator, **SAMPLER_KWARGS.get(name, {}))
    assert abs(out.mean().item() - MU) < 0.045
    assert abs(out.std().item() - S) < 0.035


@pytest.mark.parametrize("sampler, order", [(sample_euler, 1), (sample_heun, 2), (sample_dpmpp_2m, 2),
                                            (sample_ddim, 1)])
def test_deterministic_samplers_converge_at_their_order(sampler, order):
    slope, errors = convergence_slope(sampler)
    assert errors[-1] < errors[0]
    assert -order - 0.35 < slope < -order + 0.35, (slope, errors)


def test_ddim_eta0_is_euler_and_the_vp_ddim_update():
    """DDIM with eta = 0 (Song et al. 2021, eq. 12, computed on VP x_t) equals Euler in VE coordinates."""
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    timesteps = torch.tensor([999, 799, 599, 399, 199, 0])
    alphas = torch.cat([schedule.alphas_cumprod[timesteps].double(), torch.ones(1, dtype=torch.float64)])
    sigmas = ((1 - alphas) / alphas).sqrt()  # ..., 0
    x_t = torch.linspace(-3, 3, 7, dtype=torch.float64).view(7, 1)  # VP x_T
    # Reference: the VP DDIM update x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    x = x_t.clone()
    for a, a_prev in zip(alphas[:-1], alphas[1:]):
        sigma = ((1 - a) / a).sqrt()
        x0 = gaussian_denoiser(x / a.sqrt(), sigma.view(1))
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    x_ve = x_t * (1 + sigmas[0] ** 2).sqrt()
    ddim = sample_ddim(gaussian_denoiser, x_ve, sigmas)
    euler = sample_euler(gaussian_denoiser, x_ve, sigmas)
    torch.testing.assert_close(ddim, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(euler, x, rtol=1e-10, atol=1e-10)


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m():
    sigmas = karras_sigmas(12, 0.01, 20.0).double()
    x = torch.linspace(-30, 30, 5, dtype=torch.float64).view(5, 1)
    ode = sample_dpmpp_2m(gaussian_denoiser, x, sigmas)
    torch.testing.assert_close(sample_dpmpp_2m_sde(gaussian_denoiser, x, sigmas, eta=0.0), ode)
    # eta = 0 with the "heun" solver type is DPM-Solver++(2M)'s other second-order variant: close, not equal.
    heun_type = sample_dpmpp_2m_sde(gaussian_denoiser, x, sigmas, eta=0.0, solver_type="heun")
    assert 0 < (heun_type - ode).abs().max() < 0.05


def test_seeded_noise_is_reproducible_and_callback_reports_every_step():
    sigmas = karras_sigmas(6, 0.01, 10.0)
    seen = []
    a = SAMPLERS["euler_a"](gaussian_denoiser, torch.zeros(3, 2), sigmas, generator=torch.Generator().manual_seed(5),
                            callback=lambda d: seen.append((d["i"], d["sigma"])))
    b = SAMPLERS["euler_a"](gaussian_denoiser, torch.zeros(3, 2), sigmas, generator=torch.Generator().manual_seed(5))
    c = SAMPLERS["euler_a"](gaussian_denoiser, torch.zeros(3, 2), sigmas, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert [i for i, _ in seen] == list(range(6)) and seen[0][1] == pytest.approx(10.0)


class _LinearNet(torch.nn.Module):
    """A network that is exact for Gaussian data under a given parameterisation (tests the denoiser adapters)."""

    def __init__(self, scaling, noise_to_sigma):
        super().__init__()
        self.scaling, self.noise_to_sigma = scaling, noise_to_sigma

    def forward(self, x_in, c_noise):
        sigma = self.noise_to_sigma(c_noise).view(-1, 1)
        c_skip, c_out, c_in, _ = (c.view(-1, 1) for c in self.scaling(sigma.flatten()))
        x = x_in / c_in
        return (gaussian_denoiser(x, sigma.flatten()) - c_skip * x) / c_out  # F = (D - c_skip x) / c_out


def test_denoiser_adapters_recover_the_exact_denoiser():
    x = torch.linspace(-5, 5, 11, dtype=torch.float64).view(11, 1)
    sigma = torch.full((11,), 2.3, dtype=torch.float64)
    edm = EDMDenoiser(_LinearNet(EDMScaling(0.5), lambda c: (4 * c).exp()), sigma_data=0.5)
    torch.testing.assert_close(edm(x, sigma), gaussian_denoiser(x, sigma))
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    v_model = DiscreteDenoiser(_LinearNet(VScaling(), schedule.t_to_sigma), schedule, "v_prediction")
    torch.testing.assert_close(v_model(x, sigma), gaussian_denoiser(x, sigma))

"""Schedules that repeat a sigma (a step of zero length), checked against k-diffusion's contract from the maths:
the ancestral samplers draw a noise on every step to sigma_next > 0 (k-diffusion's `sample_euler_ancestral`,
`sample_dpm_2_ancestral`, `sample_dpmpp_2s_ancestral`), and the multistep solvers skip the zero-length step without
counting it in their history (it used to divide by zero on the next step)."""
import math

import pytest
import torch

from ldm.diffusion import (
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_euler_ancestral,
)
from ldm.runtime import randn

SHAPE = (2, 3, 4, 4)


def zero_denoiser(x, sigma, cond=None):
    """D = 0: every deterministic step towards sigma_to scales x by sigma_to / sigma, whatever the solver's order."""
    return torch.zeros_like(x)


def gaussian_denoiser(x, sigma, cond=None):
    """The exact denoiser of N(0.5, 0.7^2) data."""
    sigma = sigma.to(x.dtype).view(-1, 1, 1, 1)
    return 0.5 + 0.49 / (0.49 + sigma**2) * (x - 0.5)


@pytest.mark.parametrize("sampler", [sample_euler_ancestral, sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral])
def test_ancestral_samplers_draw_noise_on_a_zero_length_step(sampler):
    """sigmas 4, 2, 2, 1, 0 with D = 0: the steps take x to sigma_down * x / sigma and add sigma_up z. The draws are
    z0 (step 0), z1 (step 1, zero length, sigma_up 0: drawn and unused, as k-diffusion does) and z2 (step 2); the
    step to 0 draws none. Before the fix step 2 used z1 (0.67 to 1.0 of the sample away from k-diffusion's)."""
    sigmas = torch.tensor([4.0, 2.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    out = sampler(zero_denoiser, x0.clone(), sigmas, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    z0, _z1, z2 = (randn(SHAPE, g, torch.float64) for _ in range(3))
    x = x0
    for sigma, sigma_next, z in [(4.0, 2.0, z0), (2.0, 1.0, z2)]:
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = x * (sigma_down / sigma) + sigma_up * z
    expected = torch.zeros_like(x)  # the last step lands on D = 0
    assert torch.equal(out, expected)
    # The step before the last carries the noise: stop at sigma 1 to see it.
    out = sampler(zero_denoiser, x0.clone(), sigmas[:-1], generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler, options", [(sample_dpmpp_2m, {}), (sample_dpmpp_2m_sde, {"eta": 0.0}),
                                              (sample_dpmpp_2m_sde, {"eta": 0.0, "solver_type": "heun"}),
                                              (sample_dpmpp_3m_sde, {"eta": 0.0})])
@pytest.mark.parametrize("repeat", [0, 1, 3])
def test_multistep_solvers_skip_a_repeated_sigma(sampler, options, repeat):
    """A repeated sigma adds nothing to integrate: the sample equals the one on the schedule without the repeat (the
    history's spacing in lambda is that of the distinct sigmas). It used to raise ZeroDivisionError (2M, 2M SDE) or
    return NaN (3M SDE) on the step after the repeat; k-diffusion fails the same way."""
    distinct = [14.6, 5.0, 2.0, 1.0, 0.2, 0.0]
    repeated = distinct[: repeat + 1] + distinct[repeat:]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 14.6
    ref = sampler(gaussian_denoiser, x.clone(), torch.tensor(distinct, dtype=torch.float64), **options)
    out = sampler(gaussian_denoiser, x.clone(), torch.tensor(repeated, dtype=torch.float64), **options)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)

"""k-diffusion's DPM-Solver family (dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde, dpmpp_3m_sde): known
answers on Gaussian data, diffusers' scheduler loops, and the Brownian noise of DPM++ SDE."""
import math

import pytest
import torch
from helpers import (
    SD15_SCHEDULER,
    SEED,
    SHAPE,
    assert_close_to_ref,
    convergence_slope,
    DIFFUSERS_TOLERANCE,
    run_diffusers,
    run_ours,
)
from helpers import gaussian_denoiser as den

from ldm.diffusion import (
    BrownianNoise,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
NO_NOISE = lambda sigma, sigma_next: 0.0  # noqa: E731  (the noise-free run: the SDE's mean path on Gaussian data)


@pytest.mark.parametrize("sampler, order", [(sample_dpm_2, 2), (sample_dpmpp_sde, 2)])
def test_deterministic_runs_converge_at_their_order(sampler, order):
    slope, errors = convergence_slope(lambda *a: sampler(*a, **({"eta": 0.0} if sampler is sample_dpmpp_sde else {})))
    assert errors[-1] < errors[0]
    assert -order - 0.35 < slope < -order + 0.35, (slope, errors)


def test_ancestral_samplers_with_eta_0_are_their_ode_solvers():
    sigmas = torch.exp(torch.linspace(math.log(10.0), math.log(0.05), 9, dtype=torch.float64))
    x = torch.linspace(-20, 20, 9, dtype=torch.float64).view(9, 1)
    torch.testing.assert_close(sample_dpm_2_ancestral(den, x, sigmas, eta=0.0), sample_dpm_2(den, x, sigmas))
    # DPM-Solver++(2S) with r = 1/2 is the deterministic DPM++ SDE at eta = 0: both step through the lambda-midpoint
    torch.testing.assert_close(sample_dpmpp_2s_ancestral(den, x, sigmas, eta=0.0),
                               sample_dpmpp_sde(den, x, sigmas, eta=0.0))


def test_dpmpp_3m_sde_is_third_order_multistep():
    """eta = 0 is DPM-Solver++(3M): above second order on the way (its first-order first step caps it at 2 in the
    limit); eta = 0.5 without noise follows the mean path dx/dlambda = -1.5 (x - D) just as fast."""
    slope, errors = convergence_slope(lambda *a: sample_dpmpp_3m_sde(*a, eta=0.0))
    _, errors_2m = convergence_slope(sample_dpmpp_2m)
    assert slope < -2.2 and errors[-1] < errors_2m[-1] / 2, (slope, errors, errors_2m)
    slope, errors = convergence_slope(lambda *a: sample_dpmpp_3m_sde(*a, eta=0.5, noise_sampler=NO_NOISE), drift=1.5)
    assert slope < -2.2 and errors[-1] < 1e-4, (slope, errors)


@pytest.mark.parametrize("sampler", [sample_dpmpp_sde, sample_dpmpp_3m_sde])
def test_eta_1_noise_free_run_is_the_exact_sde_mean_on_gaussian_data(sampler):
    """With eta = 1 the mean of x follows dx/dlambda = -2 (x - D), along which Gaussian data's D is constant, so an
    exponential integrator is exact in any number of steps: every coefficient (and sigma_down) is checked."""
    _, errors = convergence_slope(lambda *a: sampler(*a, noise_sampler=NO_NOISE), steps=(3, 7), drift=2.0)
    assert max(errors) < 1e-12, errors
    _, ancestral_errors = convergence_slope(lambda *a: sample_dpm_2_ancestral(*a, noise_sampler=NO_NOISE),
                                            steps=(8, 32), drift=2.0)
    assert ancestral_errors[1] < ancestral_errors[0] / 3  # an ancestral step's mean: first order, but convergent


@pytest.mark.parametrize("name, overrides, steps", [
    ("dpm_2", {}, 10),
    ("dpm_2", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 7),
    ("dpm_2_ancestral", {}, 10),
    ("dpm_2_ancestral", {"timestep_spacing": "leading"}, 6),
    ("dpmpp_sde", {}, 10),
    ("dpmpp_sde", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 5),
    ("dpmpp_3m_sde", {}, 3),  # orders 1 and 2 and the noise; diffusers' third-order SDE step is not k-diffusion's
    ("dpmpp_3m_sde", {"timestep_spacing": "leading", "prediction_type": "v_prediction"}, 3),
])
def test_matches_diffusers(name, overrides, steps):
    config = {**SD15_SCHEDULER, **overrides}
    ref, ref_t = run_diffusers(name, config, steps, SHAPE, seed=SEED + 3)
    ours, our_t = run_ours(name, config, steps, SHAPE, seed=SEED + 3)
    t_atol, rel = DIFFUSERS_TOLERANCE  # the midpoints' timesteps too
    assert our_t == pytest.approx(ref_t, abs=t_atol)
    assert ref.std() > 0.3
    assert_close_to_ref(ours, ref, rel=rel)


@pytest.mark.parametrize("sampler", [sample_euler, sample_dpm_2])
def test_churn_draws_noise_on_every_step_also_outside_its_window(sampler):
    """EDM Alg. 2 with k-diffusion's noise stream: step 1 (sigma 10, outside [0, 7]) draws z0 and leaves it unused;
    step 2 raises sigma 5 to sigma_hat = 5 (1 + gamma) with z1, then steps to 0, i.e. to D(x, sigma_hat)."""
    x = torch.linspace(-20, 20, 9, dtype=torch.float64).view(9, 1)
    sigmas = torch.tensor([10.0, 5.0, 0.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(SEED)
    z = [torch.randn(9, 1, generator=generator, dtype=torch.float64) for _ in range(2)]  # one draw per step
    options = {"s_churn": 0.6, "s_tmin": 0.0, "s_tmax": 7.0, "s_noise": 1.1}
    ours = sampler(den, x, sigmas, generator=torch.Generator().manual_seed(SEED), **options)
    x_1 = sample_euler(den, x, sigmas[:2])  # no churn at sigma 10; DPM-Solver-2 on Gaussian data is not Euler:
    if sampler is sample_dpm_2:
        x_1 = sample_dpm_2(den, x, sigmas[:2])
    sigma_hat = 5 * (1 + 0.3)  # gamma = min(0.6 / 2, sqrt(2) - 1)
    expected = den(x_1 + z[1] * 1.1 * math.sqrt(sigma_hat**2 - 25), torch.tensor([sigma_hat], dtype=torch.float64))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_brownian_noise_is_one_path():
    """Increments of one path: standard normal, the midpoint's correlated with the whole step's as sqrt(dt_1 / dt);
    asked for whole steps only, it is one fresh draw per step from the generator."""
    x = torch.zeros(40000, dtype=torch.float64)
    noise = BrownianNoise(x, torch.Generator().manual_seed(SEED))
    half, whole = noise(4.0, 3.0), noise(4.0, 1.0)
    assert abs(half.std().item() - 1) < 0.02 and abs(whole.std().item() - 1) < 0.02
    correlation = torch.corrcoef(torch.stack([half, whole]))[0, 1].item()
    assert abs(correlation - math.sqrt(1 / 3)) < 0.02, correlation
    steps = BrownianNoise(x[:5], torch.Generator().manual_seed(SEED))
    generator = torch.Generator().manual_seed(SEED)
    draws = [torch.randn(5, generator=generator, dtype=torch.float64) for _ in range(2)]
    torch.testing.assert_close([steps(4.0, 3.0), steps(3.0, 1.0)], draws)
    with pytest.raises(ValueError, match="walks sigma downwards"):
        steps(5.0, 0.5)


def test_dpmpp_sde_is_reproducible_and_its_noise_matters():
    sigmas = torch.exp(torch.linspace(math.log(10.0), math.log(0.05), 7))
    x = torch.linspace(-20, 20, 8).view(8, 1)
    a, b, c = (sample_dpmpp_sde(den, x, sigmas, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and (a - c).abs().max() > 0.01
    assert (a - sample_euler(den, x, sigmas)).abs().max() > 0.01


@pytest.mark.parametrize("name", ["euler_a", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde",
                                  "dpmpp_3m_sde"])
def test_a_noise_sampler_replaces_the_generators_draws(name):
    """k-diffusion's contract: `noise_sampler(sigma, sigma_next)` is the step's noise. Replaying the generator's own
    draws gives the generator's sample exactly; a scaled replay moves it (the noise is really taken from it)."""
    from ldm.diffusion.sampler_registry import SAMPLERS
    from ldm.runtime import randn

    sampler = SAMPLERS[name]
    sigmas = torch.tensor([14.6, 6.0, 2.0, 0.7, 0.2, 0.0], dtype=torch.float64)
    x = 14.6 * torch.randn(7, 1, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    reference = sampler(den, x, sigmas, generator=torch.Generator().manual_seed(SEED + 1))
    replay = torch.Generator().manual_seed(SEED + 1)
    same = sampler(den, x, sigmas, noise_sampler=lambda s, s_next: randn(x.shape, replay, x.dtype))
    assert_close_to_ref(same, reference, rel=1e-12, floor=0)
    replay.manual_seed(SEED + 1)
    louder = sampler(den, x, sigmas, noise_sampler=lambda s, s_next: 2 * randn(x.shape, replay, x.dtype))
    assert (louder - reference).abs().max() > 1e-3 * reference.abs().max()

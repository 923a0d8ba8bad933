"""UniPC (bh2, order 2) and LMS: known answers on Gaussian data and diffusers' own scheduler loops."""
import pytest
import torch
from helpers import SD15_SCHEDULER, SHAPE, convergence_slope, gaussian_denoiser, run_diffusers, run_ours

from ldm.diffusion import sample_dpmpp_2m, sample_euler, sample_lms, sample_unipc
from ldm.diffusion.schedules import karras_sigmas

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_lms_of_order_one_is_euler():
    sigmas = karras_sigmas(10, 0.02, 30.0).double()
    x = torch.linspace(-40, 40, 7, dtype=torch.float64).view(7, 1)
    torch.testing.assert_close(sample_lms(gaussian_denoiser, x, sigmas, order=1),
                               sample_euler(gaussian_denoiser, x, sigmas), rtol=1e-12, atol=1e-12)


def test_unipc_corrector_raises_the_order_above_dpm_solver_2m():
    """UniP-2 alone is DPM-Solver++(2M) (second order); UniC lifts it to third order (Zhao et al. 2023)."""
    slope, errors = convergence_slope(sample_unipc)
    dpm_slope, dpm_errors = convergence_slope(sample_dpmpp_2m)
    assert -3.35 < slope < -2.65 and -2.35 < dpm_slope < -1.65, (slope, dpm_slope)
    assert errors[-1] < dpm_errors[-1] / 10


def test_lms_converges_faster_than_second_order():
    slope, errors = convergence_slope(sample_lms)
    low, _ = convergence_slope(lambda *a: sample_lms(*a, order=2))
    assert slope < -2.65 and slope < low - 1, (slope, low, errors)


@pytest.mark.parametrize("name", ["unipc", "lms"])
@pytest.mark.parametrize("overrides, steps", [
    ({}, 1),
    ({}, 2),
    ({"timestep_spacing": "leading"}, 10),
    ({"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 7),
    ({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "steps_offset": 0}, 25),
])
def test_other_configs_match_diffusers(name, overrides, steps):
    config = {**SD15_SCHEDULER, **overrides}
    ref, ref_t = run_diffusers(name, config, steps, SHAPE, seed=3)
    ours, our_t = run_ours(name, config, steps, SHAPE, seed=3)
    assert our_t == pytest.approx(ref_t, abs=2e-3)
    assert ref.std() > 0.01
    assert (ours - ref).abs().max() <= 2e-5 * ref.abs().max() + 1e-6


def test_unipc_zero_terminal_snr_matches_diffusers():
    config = {**SD15_SCHEDULER, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
              "rescale_betas_zero_snr": True}
    ref, _ = run_diffusers("unipc", config, 8, SHAPE, seed=4)
    ours, _ = run_ours("unipc", config, 8, SHAPE, seed=4)
    assert (ours - ref).abs().max() <= 2e-5 * ref.abs().max() + 1e-6

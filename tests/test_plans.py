"""Parity with diffusers' scheduler loops: same seed, same analytic model, same final sample."""
import numpy as np
import pytest
import torch
from helpers import (
    DIFFUSERS_SCHEDULERS,
    DIFFUSERS_SHORT_RUNS_ONLY,
    SD15_SCHEDULER,
    SHAPE,
    assert_close_to_ref,
    DIFFUSERS_TOLERANCE,
    run_diffusers,
    run_ours,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from ldm.diffusion import DiscreteSchedule, ScheduleConfig, sampling_plan  # noqa: E402


@pytest.mark.parametrize("name", [name for name in DIFFUSERS_SCHEDULERS if name not in DIFFUSERS_SHORT_RUNS_ONLY])
def test_sd15_config_matches_diffusers(name):
    ref, ref_t = run_diffusers(name, SD15_SCHEDULER, 12, SHAPE)
    ours, our_t = run_ours(name, SD15_SCHEDULER, 12, SHAPE)
    t_atol, rel = DIFFUSERS_TOLERANCE
    # The network was called at the same timesteps (integers stay integers, floats round-trip through sigma).
    np.testing.assert_allclose(our_t, ref_t, atol=t_atol)
    assert ours.std() > 0.3  # a real sample, not a collapsed one
    assert_close_to_ref(ours, ref, rel=rel)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("ddim", {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "set_alpha_to_one": True}),
        ("ddim", {"timestep_spacing": "leading", "eta": 1.0}),
        ("euler", {"timestep_spacing": "leading"}),
        ("euler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),
        ("euler_a", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
        ("dpmpp_2m", {"timestep_spacing": "leading"}),
        ("dpmpp_2m", {"timestep_spacing": "trailing", "prediction_type": "v_prediction",
                      "rescale_betas_zero_snr": True}),
        ("ddpm", {"timestep_spacing": "linspace", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
        ("heun", {"timestep_spacing": "trailing"}),
        ("dpmpp_2m_sde", {"solver_type": "heun", "prediction_type": "v_prediction"}),
        ("ddim", {"timestep_spacing": "linspace", "set_alpha_to_one": True}),  # uneven: needs sigmas_next
        ("ddim", {"beta_schedule": "squaredcos_cap_v2"}),  # (from t = 999 its sigma of 2e4 defeats float32)
        ("ddim", {"timestep_spacing": "trailing", "steps": 7, "eta": 0.5}),
    ],
)
def test_other_configs_match_diffusers(name, overrides):
    overrides = dict(overrides)
    eta, steps = overrides.pop("eta", 0.0), overrides.pop("steps", 10)
    config = {**SD15_SCHEDULER, **overrides}
    ref, _ = run_diffusers(name, config, steps, SHAPE, seed=1, eta=eta)
    ours, _ = run_ours(name, config, steps, SHAPE, seed=1, eta=eta)
    assert_close_to_ref(ours, ref)


def test_ddpm_learned_variance_matches_diffusers():
    """DDPM with Improved DDPM's learned-range variance: eq. 15 interpolation on the strided schedule."""
    config = {**SD15_SCHEDULER, "steps_offset": 0, "variance_type": "learned_range", "beta_schedule": "linear",
              "beta_start": 1e-4, "beta_end": 0.02}
    ref, _ = run_diffusers("ddpm", config, 10, SHAPE, seed=2)
    ours, _ = run_ours("ddpm", config, 10, SHAPE, seed=2)
    fixed, _ = run_ours("ddpm", {**config, "variance_type": "fixed_small"}, 10, SHAPE, seed=2)
    assert (fixed - ref).abs().max() > 1e-2  # the learned variance really changed the sample
    assert_close_to_ref(ours, ref)


def test_plan_values_sd15():
    ddim = sampling_plan(SD15_SCHEDULER, "ddim", 50)
    assert ddim.timesteps[:3].tolist() == [981, 961, 941] and int(ddim.timesteps[-1]) == 1
    sigmas = DiscreteSchedule.from_config(ScheduleConfig.from_diffusers(SD15_SCHEDULER)).sigmas
    assert float(ddim.sigmas[0]) == float(sigmas[981])
    # set_alpha_to_one = False: DDIM ends at alpha_bar_0, i.e. sigma_0, and the sample is mapped back to VP scale.
    assert float(ddim.sigmas[-1]) == pytest.approx(float(sigmas[0]))
    assert ddim.final_scale == pytest.approx(float(1 / (1 + sigmas[0] ** 2).sqrt()))
    assert ddim.init_noise_scale == pytest.approx(float((1 + sigmas[981] ** 2).sqrt()))
    # linspace by default: starts at t = 999 with init sigma = sigma_max
    euler = sampling_plan(SD15_SCHEDULER, "euler", 50)
    assert float(euler.timesteps[0]) == 999 and float(euler.sigmas[-1]) == 0
    assert euler.init_noise_scale == pytest.approx(float(sigmas[-1]), rel=1e-6)
    dpm = sampling_plan(SD15_SCHEDULER, "dpmpp_2m", 25)
    assert dpm.timesteps[:2].tolist() == [999, 959] and len(dpm.sigmas) == 26


def test_ddim_uneven_spacing_carries_sigmas_next_and_skip_slices_it():
    plan = sampling_plan({**SD15_SCHEDULER, "timestep_spacing": "linspace"}, "ddim", 10)
    assert plan.timesteps[:3].tolist() == [999, 888, 777]
    sigmas = DiscreteSchedule.from_config(ScheduleConfig.from_diffusers(SD15_SCHEDULER)).sigmas
    # diffusers steps 999 -> 899 (= 999 - 1000 // 10) although it evaluates 888 next
    assert float(plan.sampler_kwargs["sigmas_next"][0]) == float(sigmas[899])
    later = plan.skip(4)
    assert later.timesteps.tolist() == plan.timesteps[4:].tolist() and len(later.sigmas) == 7
    assert torch.equal(later.sampler_kwargs["sigmas_next"], plan.sampler_kwargs["sigmas_next"][4:])
    assert sampling_plan(SD15_SCHEDULER, "ddim", 10).sampler_kwargs == {}  # leading: even steps, nothing extra

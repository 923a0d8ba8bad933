"""Beta schedules, zero-terminal-SNR rescaling, Karras sigmas, the t <-> sigma maps and ScheduleConfig."""
import math

import numpy as np
import pytest
import torch

from ldm.diffusion import (
    DiscreteSchedule,
    ScheduleConfig,
    cosine_betas,
    karras_sigmas,
    linear_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)
from ldm.errors import ConfigError


def test_cosine_schedule_matches_closed_form():
    """alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi / 2) (Nichol & Dhariwal 2021, eq. 17)."""
    betas = cosine_betas(1000)
    alphas_cumprod = torch.cumprod(1 - betas.double(), 0)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = torch.tensor([f((i + 1) / 1000) / f(0) for i in range(1000)], dtype=torch.float64)
    torch.testing.assert_close(alphas_cumprod[:900], expected[:900], rtol=2e-5, atol=1e-7)
    assert float(betas.max()) == pytest.approx(0.999) and float(betas[-1]) == pytest.approx(0.999)


def test_linear_and_scaled_linear_are_diffusers_betas():
    diffusers = pytest.importorskip("diffusers")
    cases = [("linear", 1e-4, 0.02, linear_betas(1000, 1e-4, 0.02)),
             ("scaled_linear", 0.00085, 0.012, scaled_linear_betas(1000, 0.00085, 0.012)),
             ("squaredcos_cap_v2", 1e-4, 0.02, cosine_betas(1000))]
    for name, start, end, ours in cases:
        ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=start, beta_end=end).betas
        assert torch.equal(ours, ref), name
        # the same float32 alphas_cumprod as diffusers, bit for bit: what exact parity rests on
        ref_ac = diffusers.DDPMScheduler(beta_schedule=name, beta_start=start, beta_end=end).alphas_cumprod
        assert torch.equal(torch.cumprod(1 - ours, 0), ref_ac), name
    assert float(scaled_linear_betas(1000)[0]) == pytest.approx(0.00085)
    assert float(scaled_linear_betas(1000)[-1]) == pytest.approx(0.012)


def test_zero_terminal_snr():
    """Lin et al. 2023, Alg. 1: alpha_bar_T = 0 exactly, alpha_bar_0 unchanged, sqrt(alpha_bar) affine in the old."""
    betas = scaled_linear_betas(1000)
    old = torch.cumprod(1 - betas.double(), 0)
    new = torch.cumprod(1 - rescale_zero_terminal_snr(betas).double(), 0)
    assert float(new[-1]) == 0.0
    assert float(new[0]) == pytest.approx(float(old[0]), rel=1e-6)
    a, b = old.sqrt(), new.sqrt()
    slope = (b[0] - b[500]) / (a[0] - a[500])
    torch.testing.assert_close(b, slope * (a - a[-1]), atol=1e-6, rtol=1e-4)
    # The schedule replaces the terminal 0 by 2**-24 so that every sigma is finite.
    schedule = DiscreteSchedule.from_config(ScheduleConfig(rescale_betas_zero_snr=True))
    assert schedule.sigma_max == pytest.approx(math.sqrt((1 - 2**-24) / 2**-24), rel=1e-5)
    assert torch.isfinite(schedule.sigmas).all()


def test_karras_sigmas():
    sigmas = karras_sigmas(10, 0.002, 80.0, rho=7.0)
    assert sigmas.shape == (11,) and float(sigmas[-1]) == 0.0
    assert float(sigmas[0]) == pytest.approx(80.0) and float(sigmas[-2]) == pytest.approx(0.002)
    steps = sigmas[:-1].double() ** (1 / 7)
    torch.testing.assert_close(steps.diff(), steps.diff()[:1].expand(9), rtol=1e-5, atol=0)  # uniform in sigma^(1/rho)


@pytest.fixture(scope="module")
def sd_schedule():
    return DiscreteSchedule.from_config(ScheduleConfig())


def test_sigmas_and_linear_interpolation(sd_schedule):
    a = sd_schedule.alphas_cumprod.double()
    torch.testing.assert_close(sd_schedule.sigmas.double(), ((1 - a) / a).sqrt(), rtol=1e-6, atol=0)
    t = torch.tensor([0.0, 0.25, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    expected = np.interp(t.numpy(), np.arange(1000), sd_schedule.sigmas.numpy())
    np.testing.assert_allclose(sd_schedule.t_to_sigma(t).numpy(), expected, rtol=1e-12)


def test_sigma_to_t_inverts_t_to_sigma(sd_schedule):
    t = torch.tensor([0.3, 1.7, 123.456, 500.5, 977.77, 998.999], dtype=torch.float64)
    back = sd_schedule.sigma_to_t(sd_schedule.t_to_sigma(t))
    torch.testing.assert_close(back, t, atol=1e-9, rtol=0)
    # Integer timesteps survive a trip through float32 sigmas as exact integers (what DDIM/DDPM networks were fed).
    ints = torch.arange(0, 1000, 37)
    assert torch.equal(sd_schedule.sigma_to_t(sd_schedule.sigmas[ints]), ints.double())
    # sigma outside the table clamps to the ends of the training range.
    assert sd_schedule.sigma_to_t(torch.tensor([0.0, 1e4])).tolist() == [0.0, 999.0]
    prev = sd_schedule.sigma_prev(torch.tensor([0, 1, 999]))
    assert prev.tolist() == [0.0] + sd_schedule.sigmas[[0, 998]].double().tolist()


def test_schedule_config_from_diffusers():
    config = ScheduleConfig.from_diffusers({
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_start": 0.00085,
        "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
    })
    assert config.prediction_type == "v_prediction" and config.steps_offset == 1 and config.set_alpha_to_one is False
    assert config.timestep_spacing == "trailing" and config.rescale_betas_zero_snr
    assert ScheduleConfig.from_diffusers({"beta_schedule": "squaredcos_cap_v2"}).betas().equal(cosine_betas(1000))
    trained = ScheduleConfig.from_diffusers({"trained_betas": [0.1, 0.2, 0.3]})
    assert torch.allclose(DiscreteSchedule.from_config(trained).alphas_cumprod, torch.tensor([0.9, 0.72, 0.504]))
    with pytest.raises(ConfigError, match="beta_schedule"):
        ScheduleConfig(beta_schedule="sigmoid")
    with pytest.raises(ConfigError, match="prediction_type"):
        ScheduleConfig.from_diffusers({"prediction_type": "flow"})

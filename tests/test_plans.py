"""Parity with diffusers' scheduler loops: same seed, same analytic model, same final sample."""
import inspect

import numpy as np
import pytest
import torch
from helpers import assert_close_to_ref

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from ldm.diffusion import DiscreteDenoiser, DiscreteSchedule, SAMPLERS, ScheduleConfig, sampling_plan  # noqa: E402

# Stable Diffusion 1.5's scheduler_config.json (a PNDMScheduler config: no timestep_spacing, steps_offset 1).
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SCHEDULERS = {
    "ddim": lambda cfg: diffusers.DDIMScheduler.from_config(cfg),
    "ddpm": lambda cfg: diffusers.DDPMScheduler.from_config(cfg),
    "euler": lambda cfg: diffusers.EulerDiscreteScheduler.from_config(cfg),
    "euler_a": lambda cfg: diffusers.EulerAncestralDiscreteScheduler.from_config(cfg),
    "heun": lambda cfg: diffusers.HeunDiscreteScheduler.from_config(cfg),
    "dpmpp_2m": lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++"),
    "dpmpp_2m_sde": lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="sde-dpmsolver++"
    ),
    "unipc": lambda cfg: diffusers.UniPCMultistepScheduler.from_config(cfg),  # bh2, order 2 by default
    "lms": lambda cfg: diffusers.LMSDiscreteScheduler.from_config(cfg),
}

MU, STD = 0.3, 0.8  # the data: every element ~ N(MU, STD^2) independently


class GaussianNet:
    """The exact eps / v network for Gaussian data, computing sigma from t with its own copy of the schedule."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str, learned_variance: bool = False):
        a = alphas_cumprod.double().numpy()
        self.learned_variance = learned_variance
        self.sigmas = np.sqrt((1 - a) / a)
        self.prediction = prediction
        self.timesteps_seen = []

    def __call__(self, x_in: torch.Tensor, t, **cond) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_in.shape[0])
        self.timesteps_seen.append(float(t[0]))
        sigma = torch.from_numpy(np.interp(t.numpy(), np.arange(len(self.sigmas)), self.sigmas)).view(-1, 1, 1, 1)
        alpha = 1 / (1 + sigma**2).sqrt()
        x = x_in.double() / alpha  # VP input -> VE coordinates
        x0 = MU + STD**2 / (STD**2 + sigma**2) * (x - MU)  # the exact denoiser D(x, sigma)
        eps = (x - x0) / sigma
        out = eps if self.prediction == "epsilon" else alpha * eps - alpha * sigma * x0  # v = a eps - s_vp x0
        if self.learned_variance:  # a made-up variance output in [-1, 1] that depends on x and t
            out = torch.cat([out, torch.tanh(x_in.double() * 3 + t.view(-1, 1, 1, 1) / 500 - 1)], dim=1)
        return out.float()


def run_diffusers(name: str, config: dict, steps: int, shape, seed: int = 0, eta: float = 0.0):
    scheduler = SCHEDULERS[name](config)
    scheduler.set_timesteps(steps)
    learned = config.get("variance_type") == "learned_range"
    net = GaussianNet(scheduler.alphas_cumprod, config.get("prediction_type", "epsilon"), learned)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    accepted = inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if "generator" in accepted else {}
    if name == "ddim":
        extra["eta"] = eta
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x, **extra).prev_sample
    return x, net.timesteps_seen


def run_ours(name: str, config: dict, steps: int, shape, seed: int = 0, eta: float = 0.0):
    schedule_config = ScheduleConfig.from_diffusers(config)
    schedule = DiscreteSchedule.from_config(schedule_config)
    alphas_cumprod = torch.cumprod(1 - schedule_config.betas(), 0)
    alphas_cumprod[alphas_cumprod <= 0] = 2**-24  # zero terminal SNR: the stand-in diffusers' Euler/DPM use
    net = GaussianNet(alphas_cumprod, schedule_config.prediction_type, config.get("variance_type") == "learned_range")
    denoiser = DiscreteDenoiser(net, schedule, schedule_config.prediction_type)
    plan = sampling_plan(schedule_config, name, steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * plan.init_noise_scale
    extra = {"eta": eta} if name == "ddim" else {}
    if name == "dpmpp_2m_sde" and "solver_type" in config:
        extra["solver_type"] = config["solver_type"]
    x = SAMPLERS[name](denoiser, x, plan.sigmas, None, generator=generator, **extra, **plan.sampler_kwargs)
    return x * plan.final_scale, net.timesteps_seen


SHAPE = (2, 3, 4, 4)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sd15_config_matches_diffusers(name):
    ref, ref_t = run_diffusers(name, SD15, 12, SHAPE)
    ours, our_t = run_ours(name, SD15, 12, SHAPE)
    # The network was called at the same timesteps (integers stay integers, floats round-trip through sigma).
    np.testing.assert_allclose(our_t, ref_t, atol=2e-3)
    assert ours.std() > 0.3  # a real sample, not a collapsed one
    assert_close_to_ref(ours, ref)


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
    config = {**SD15, **overrides}
    ref, _ = run_diffusers(name, config, steps, SHAPE, seed=1, eta=eta)
    ours, _ = run_ours(name, config, steps, SHAPE, seed=1, eta=eta)
    assert_close_to_ref(ours, ref)


def test_ddpm_learned_variance_matches_diffusers():
    """DDPM with Improved DDPM's learned-range variance: eq. 15 interpolation on the strided schedule."""
    config = {**SD15, "steps_offset": 0, "variance_type": "learned_range", "beta_schedule": "linear",
              "beta_start": 1e-4, "beta_end": 0.02}
    ref, _ = run_diffusers("ddpm", config, 10, SHAPE, seed=2)
    ours, _ = run_ours("ddpm", config, 10, SHAPE, seed=2)
    fixed, _ = run_ours("ddpm", {**config, "variance_type": "fixed_small"}, 10, SHAPE, seed=2)
    assert (fixed - ref).abs().max() > 1e-2  # the learned variance really changed the sample
    assert_close_to_ref(ours, ref)


def test_plan_values_sd15():
    ddim = sampling_plan(SD15, "ddim", 50)
    assert ddim.timesteps[:3].tolist() == [981, 961, 941] and int(ddim.timesteps[-1]) == 1
    sigmas = DiscreteSchedule.from_config(ScheduleConfig.from_diffusers(SD15)).sigmas
    assert float(ddim.sigmas[0]) == float(sigmas[981])
    # set_alpha_to_one = False: DDIM ends at alpha_bar_0, i.e. sigma_0, and the sample is mapped back to VP scale.
    assert float(ddim.sigmas[-1]) == pytest.approx(float(sigmas[0]))
    assert ddim.final_scale == pytest.approx(float(1 / (1 + sigmas[0] ** 2).sqrt()))
    assert ddim.init_noise_scale == pytest.approx(float((1 + sigmas[981] ** 2).sqrt()))
    euler = sampling_plan(SD15, "euler", 50)  # linspace by default: starts at t = 999 with init sigma = sigma_max
    assert float(euler.timesteps[0]) == 999 and float(euler.sigmas[-1]) == 0
    assert euler.init_noise_scale == pytest.approx(float(sigmas[-1]), rel=1e-6)
    dpm = sampling_plan(SD15, "dpmpp_2m", 25)
    assert dpm.timesteps[:2].tolist() == [999, 959] and len(dpm.sigmas) == 26


def test_ddim_uneven_spacing_carries_sigmas_next_and_skip_slices_it():
    plan = sampling_plan({**SD15, "timestep_spacing": "linspace"}, "ddim", 10)
    assert plan.timesteps[:3].tolist() == [999, 888, 777]
    sigmas = DiscreteSchedule.from_config(ScheduleConfig.from_diffusers(SD15)).sigmas
    # diffusers steps 999 -> 899 (= 999 - 1000 // 10) although it evaluates 888 next
    assert float(plan.sampler_kwargs["sigmas_next"][0]) == float(sigmas[899])
    later = plan.skip(4)
    assert later.timesteps.tolist() == plan.timesteps[4:].tolist() and len(later.sigmas) == 7
    assert torch.equal(later.sampler_kwargs["sigmas_next"], plan.sampler_kwargs["sigmas_next"][4:])
    assert sampling_plan(SD15, "ddim", 10).sampler_kwargs == {}  # leading: even steps, nothing extra

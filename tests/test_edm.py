"""EDM models (Karras et al. 2022) end to end: config, sampling plan, pipeline, training; lognormal needs edm."""
import json
import math

import pytest
import torch
from helpers import tiny_train_config, write_tiny_sd

from ldm.config import load_yaml, save_yaml
from ldm.diffusion.denoiser import DiscreteDenoiser, EDMDenoiser, build_denoiser
from ldm.diffusion.losses import EDMWeighting, LogNormalSigmaSampler
from ldm.diffusion.plans import sampling_plan
from ldm.diffusion.sampler_registry import SAMPLERS, get_sampler
from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig, karras_sigmas
from ldm.errors import ConfigError
from ldm.pipeline import load_pipeline
from ldm.train import loop
from ldm.runtime import derive_seed


def test_edm_schedule_config_defaults_validation_and_diffusers_mapping(tmp_path):
    edm = ScheduleConfig(prediction_type="edm")
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data, edm.rho) == (0.002, 80.0, 0.5, 7.0)
    assert ScheduleConfig().sigma_min is None  # discrete models carry no EDM fields
    with pytest.raises(ConfigError, match="sigma_max only apply to prediction_type edm"):
        ScheduleConfig(prediction_type="epsilon", sigma_max=20.0)
    with pytest.raises(ConfigError, match="sigma_min < sigma_max"):
        ScheduleConfig(prediction_type="edm", sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ConfigError, match="no discrete timesteps"):
        DiscreteSchedule.from_config(edm)

    diffusers = pytest.importorskip("diffusers")
    diffusers.EDMEulerScheduler(sigma_min=0.01, sigma_max=20.0, sigma_data=0.6, rho=5.0).save_config(tmp_path)
    read = ScheduleConfig.from_diffusers(json.loads((tmp_path / "scheduler_config.json").read_text()))
    assert (read.prediction_type, read.sigma_min, read.sigma_max, read.sigma_data, read.rho) == \
        ("edm", 0.01, 20.0, 0.6, 5.0)
    # diffusers' Euler has sigma_min/sigma_max for inference-time Karras sigmas: not a description of the model.
    euler = ScheduleConfig.from_diffusers({"_class_name": "EulerDiscreteScheduler", "sigma_min": 0.1,
                                           "sigma_max": 10.0, "prediction_type": "v_prediction"})
    assert euler.prediction_type == "v_prediction" and euler.sigma_min is None and euler.sigma_max is None
    with pytest.raises(ConfigError, match="v_prediction"):
        ScheduleConfig.from_diffusers({"_class_name": "EDMEulerScheduler", "prediction_type": "v_prediction"})


def test_edm_sampling_plan_is_karras_sigmas_from_sigma_max_for_every_sampler():
    config = ScheduleConfig(prediction_type="edm", sigma_min=0.01, sigma_max=20.0, rho=5.0)
    expected = karras_sigmas(6, 0.01, 20.0, 5.0)
    for sampler in SAMPLERS:
        plan = sampling_plan(config, sampler, 6)
        if get_sampler(sampler).timestep_kind == "sigma_range":  # dpm_fast, dpm_adaptive: 6 steps to sigma_min
            torch.testing.assert_close(plan.sigmas, karras_sigmas(7, 0.01, 20.0, 5.0)[:-1], rtol=0, atol=0)
        else:
            torch.testing.assert_close(plan.sigmas, expected, rtol=0, atol=0)
        assert plan.init_noise_scale == 20.0 and plan.final_scale == 1.0 and not plan.sampler_kwargs
    assert float(expected[0]) == 20.0 and float(expected[-2]) == pytest.approx(0.01)
    # a diffusers-style mapping goes through from_diffusers; steps are not bounded by num_train_timesteps
    assert len(sampling_plan({"prediction_type": "edm"}, "euler", 2000).sigmas) == 2001
    # the same sigmas as diffusers' EDMEulerScheduler (it draws x_T at sqrt(sigma_max^2 + 1), a quirk not followed)
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.EDMEulerScheduler(sigma_min=0.01, sigma_max=20.0, rho=5.0)
    reference.set_timesteps(6)
    torch.testing.assert_close(expected, reference.sigmas.float(), rtol=1e-6, atol=1e-7)


def test_build_denoiser_picks_the_parameterisation_of_the_schedule():
    net = lambda x, t: x  # noqa: E731
    edm = build_denoiser(net, ScheduleConfig(prediction_type="edm", sigma_data=0.7, sigma_max=40.0))
    assert isinstance(edm, EDMDenoiser) and edm.sigma_data == 0.7 and edm.sigma_max == 40.0
    # identity network: D = c_skip x + c_out c_in x with EDM's Table 1 coefficients
    x, sigma = torch.ones(1, 1, 1, 1), torch.tensor([2.0])
    expected = 0.49 / 4.49 + (2.0 * 0.7 / math.sqrt(4.49)) * (1 / math.sqrt(4.49))  # c_skip + c_out c_in
    torch.testing.assert_close(edm(x, sigma), torch.full_like(x, expected))
    v = build_denoiser(net, ScheduleConfig(prediction_type="v_prediction"))
    assert isinstance(v, DiscreteDenoiser) and v.prediction == "v_prediction" and v.schedule.num_timesteps == 1000


@pytest.fixture(scope="module")
def edm_model_dir(tmp_path_factory):
    folder = write_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-edm")
    config = load_yaml(folder / "config.yaml")
    config["scheduler"] = {"prediction_type": "edm"}
    save_yaml(config, folder / "config.yaml")
    return folder


def test_edm_native_model_loads_and_generates_with_log_sigma_over_4_as_timestep(edm_model_dir):
    pipe = load_pipeline(edm_model_dir, device="cpu")
    assert isinstance(pipe.denoiser, EDMDenoiser) and pipe.schedule is None
    seen = []  # (x_in, timestep) of every U-Net call
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append((args[0].clone(), args[1].clone())))
    steps = []
    try:
        images = pipe("a red circle", sampler="euler", steps=3, guidance=1.0, seed=3, height=16, width=16,
                      callback=lambda info: steps.append(info["x"].clone()))
    finally:
        hook.remove()
    assert images[0].size == (16, 16)
    sigmas = karras_sigmas(3, 0.002, 80.0, 7.0)
    assert len(seen) == 3
    for (_, t), sigma in zip(seen, sigmas[:-1]):
        torch.testing.assert_close(t, (sigma.log() / 4).expand(1))  # c_noise, not a 0..999 timestep
    # x_T = randn * sigma_max, and the U-Net sees it times c_in = 1 / sqrt(sigma^2 + sigma_data^2)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(seen[0][0], noise * 80.0 / math.sqrt(80.0**2 + 0.25))

    # The same three Euler steps written out with EDM's formulas (Table 1, Alg. 1) give the pipeline's latents.
    cond = pipe.encode_prompts(["a red circle"])
    x = noise * 80.0
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / math.sqrt(s**2 + 0.25), 1 / math.sqrt(s**2 + 0.25)
            denoised = c_skip * x + c_out * pipe.unet(c_in * x, torch.tensor([math.log(s) / 4]), **cond)
            x = x + (x - denoised) / s * (s_next - s)
    torch.testing.assert_close(steps[-1], x, rtol=1e-4, atol=1e-5)


def test_training_an_edm_model_uses_lognormal_sigmas_edm_weighting_and_exports_it(shape_shards, tmp_path, monkeypatch):
    made, sigmas = [], []

    class Spy(loop.DiffusionObjective):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def forward(self, x0, sigma, noise, cond=None, captions=None):
            sigmas.append(sigma.detach().cpu())
            return super().forward(x0, sigma, noise, cond, captions)

    monkeypatch.setattr(loop, "DiffusionObjective", Spy)
    config = tiny_train_config(shape_shards, tmp_path, "max_steps=2", "model.schedule.prediction_type=edm",
                               "loss.p_mean=-0.5", "sampling.at_end=true", "sampling.steps=2")
    out = loop.train(config)
    objective = made[0]
    assert isinstance(objective.denoiser, EDMDenoiser)
    assert isinstance(objective.sigma_sampler, LogNormalSigmaSampler)
    assert isinstance(objective.weighting, EDMWeighting)
    assert objective.weighting(torch.tensor([1.0])).item() == pytest.approx((1 + 0.25) / 0.25)
    # sample j's sigma is exp(P_mean + P_std z) with z from its own seed (seed 0, rank 0, sample j)
    got = torch.cat(sigmas)
    z = torch.cat([torch.randn(1, generator=torch.Generator().manual_seed(derive_seed(0, 0, j))) for j in range(4)])
    torch.testing.assert_close(got, (-0.5 + 1.2 * z).exp())
    assert (out / "samples" / "samples-000002.png").is_file()  # sampled with the EDM plan (train/samples.py)
    exported = load_pipeline(out, device="cpu")  # the run's model folder is an EDM model
    assert exported.schedule_config.prediction_type == "edm" and isinstance(exported.denoiser, EDMDenoiser)


def test_lognormal_sigmas_on_a_discrete_model_are_refused(shape_shards, tmp_path):
    with pytest.raises(ConfigError, match="prediction_type=edm"):
        loop.train(tiny_train_config(shape_shards, tmp_path, "max_steps=1", "loss.sigma_sampler=lognormal"))
    with pytest.raises(ConfigError, match="learn_sigma"):
        loop.train(tiny_train_config(shape_shards, tmp_path / "b", "max_steps=1",
                                     "model.schedule.prediction_type=edm", "model.unet.learn_sigma=true"))

"""A scheduler_config.json's sampling keys give diffusers' schedule: DDIM / DDPM "linspace" timesteps (rounded),
use_karras_sigmas (use_exponential_sigmas, use_beta_sigmas) and final_sigmas_type, each on the samplers whose
diffusers scheduler reads them, and ignored by the others as diffusers ignores them."""
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import (
    SD15_SCHEDULER,
    SHAPE,
    assert_close_to_ref,
    assert_same_image,
    diffusers_scheduler,
    diffusers_sd_folder,
    run_diffusers,
    run_ours,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from ldm.diffusion import sampling_plan  # noqa: E402
from ldm.diffusion.schedules import ScheduleConfig, sampling_keys_note  # noqa: E402
from ldm.errors import ConfigError  # noqa: E402
from ldm.io.formats import load_model  # noqa: E402
from ldm.pipeline.load import load_pipeline  # noqa: E402

KARRAS = {**SD15_SCHEDULER, "use_karras_sigmas": True}
SIGMA_MIN = {**SD15_SCHEDULER, "final_sigmas_type": "sigma_min"}


def diffusers_timesteps(sampler: str, config: dict, steps: int) -> np.ndarray:
    scheduler = diffusers_scheduler(sampler, config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.numpy()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("steps", [7, 8, 30])
def test_ddim_and_ddpm_linspace_timesteps_are_rounded_as_diffusers(sampler, steps):
    config = {**SD15_SCHEDULER, "timestep_spacing": "linspace"}
    plan = sampling_plan(config, sampler, steps)
    np.testing.assert_array_equal(plan.timesteps.numpy(), diffusers_timesteps(sampler, config, steps))
    ref, _ = run_diffusers(sampler, config, steps, SHAPE, seed=1)
    ours, _ = run_ours(sampler, config, steps, SHAPE, seed=1)
    assert_close_to_ref(ours, ref)


@pytest.mark.parametrize("key", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "dpm_2"])
def test_converted_sigmas_match_diffusers(sampler, spacing, key):
    config = {**SD15_SCHEDULER, key: True, "timestep_spacing": spacing}
    plan = sampling_plan(config, sampler, 8)
    plain = sampling_plan({**config, key: False}, sampler, 8)
    assert not torch.allclose(plan.sigmas, plain.sigmas)  # the key reached the plan
    # the timesteps diffusers reports: rounded for DPM-Solver / UniPC, float log-sigma interpolation for the others
    theirs = diffusers_timesteps(sampler, config, 8)
    if sampler in ("heun", "dpm_2"):  # two network calls a step: the step's own timestep, then the next / midpoint
        theirs = theirs[::2]
    ref, ref_t = run_diffusers(sampler, config, 8, SHAPE, seed=1)
    ours, our_t = run_ours(sampler, config, 8, SHAPE, seed=1)
    if sampler == "dpm_2" and key == "use_karras_sigmas":  # KDPM2 rounds Karras timesteps, ours are the sigmas' own
        np.testing.assert_allclose(plan.timesteps.numpy(), theirs, atol=0.5)
        np.testing.assert_allclose(our_t, ref_t, atol=0.5)
        return assert_close_to_ref(ours, ref, rel=1e-4)
    # diffusers' own timesteps (log-sigma interpolation; rounded by DPM-Solver / UniPC), and the network sees them
    if sampler == "dpm_2":  # KDPM2 interleaves them with the midpoints', whose sigmas it computes in float32
        np.testing.assert_allclose(plan.timesteps.numpy(), theirs, rtol=0, atol=1e-4)
        np.testing.assert_allclose(our_t, ref_t, rtol=0, atol=2e-4)
    else:
        np.testing.assert_array_equal(plan.timesteps.numpy(), theirs)
        assert our_t == ref_t
    assert_close_to_ref(ours, ref, rel=2e-6)


@pytest.mark.parametrize("steps", [8, 16])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
@pytest.mark.parametrize("key", [None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"],
                         ids=["spaced", "karras", "exponential", "beta"])
def test_final_sigma_min_matches_diffusers(sampler, steps, key):
    """The last step ends at the first training sigma; DPM-Solver's short runs take it at first order."""
    config = {**SIGMA_MIN, **({key: True} if key else {})}
    plan = sampling_plan(config, sampler, steps)
    assert float(plan.sigmas[-1]) > 0
    ref, _ = run_diffusers(sampler, config, steps, SHAPE, seed=2)
    ours, _ = run_ours(sampler, config, steps, SHAPE, seed=2)
    assert_close_to_ref(ours, ref, rel=2e-5)


@pytest.mark.parametrize("sampler", ["euler_a", "ddim", "ddpm"])
def test_samplers_whose_diffusers_scheduler_ignores_the_keys_ignore_them(sampler):
    both = {**KARRAS, "final_sigmas_type": "sigma_min"}
    plan, plain = sampling_plan(both, sampler, 8), sampling_plan(SD15_SCHEDULER, sampler, 8)
    assert torch.equal(plan.sigmas, plain.sigmas) and torch.equal(plan.timesteps, plain.timesteps)
    ref, _ = run_diffusers(sampler, both, 8, SHAPE, seed=3)
    ours, _ = run_ours(sampler, both, 8, SHAPE, seed=3)
    assert_close_to_ref(ours, ref)


def test_unknown_final_sigmas_type_is_refused():
    with pytest.raises(ConfigError, match="final_sigmas_type"):
        ScheduleConfig.from_diffusers({**SD15_SCHEDULER, "final_sigmas_type": "sigma_max"})


@pytest.fixture(scope="module")
def karras_folder(tmp_path_factory):
    """A diffusers SD folder whose scheduler_config.json is a DPM++ 2M Karras one (as fine-tunes often ship)."""
    folder, reference = diffusers_sd_folder(tmp_path_factory, diffusers.StableDiffusionPipeline)
    path = folder / "scheduler" / "scheduler_config.json"
    config = {**SD15_SCHEDULER, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
              "final_sigmas_type": "sigma_min", "algorithm_type": "dpmsolver++"}
    path.write_text(json.dumps(config))
    reference.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
    return folder, reference


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler"])
def test_a_karras_model_folder_gives_diffusers_image(karras_folder, sampler):
    folder, reference = karras_folder
    reference.scheduler = diffusers_scheduler(sampler, reference.scheduler.config)
    expected = reference("a red circle on the left", negative_prompt="blurry", num_inference_steps=8,
                         guidance_scale=5.0, height=32, width=32, generator=torch.Generator().manual_seed(7),
                         output_type="np").images[0]
    ours = load_pipeline(folder, device="cpu")
    assert ours.schedule_config.use_karras_sigmas and ours.schedule_config.final_sigmas_type == "sigma_min"
    image = ours("a red circle on the left", "blurry", sampler=sampler, steps=8, guidance=5.0, seed=7, height=32,
                 width=32)[0]
    assert_same_image(image, expected, f"{sampler} with the folder's Karras sigmas")


def test_a_diffusers_export_keeps_the_sampling_choices_only_where_made():
    from ldm.io.diffusers_format import scheduler_config_dict

    plain = scheduler_config_dict(ScheduleConfig())
    assert not {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "final_sigmas_type"} & set(plain)
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        chosen = ScheduleConfig(**{key: True}, final_sigmas_type="sigma_min")
        assert ScheduleConfig.from_diffusers(scheduler_config_dict(chosen)) == chosen


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                  "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                  "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "KDPM2DiscreteScheduler"])
def test_a_scheduler_config_at_its_defaults_needs_no_note(name):
    config = {**getattr(diffusers, name)().config, "_class_name": name}
    assert sampling_keys_note(json.loads(json.dumps(config))) is None


def test_unreproduced_sampling_keys_are_a_load_note(karras_folder, tmp_path):
    folder = shutil.copytree(karras_folder[0], tmp_path / "pipe")
    path = folder / "scheduler" / "scheduler_config.json"
    config = {**json.loads(path.read_text()), "use_lu_lambdas": True, "use_karras_sigmas": False,
              "final_sigmas_type": "sigma_min", "lower_order_final": False}
    path.write_text(json.dumps(config))
    notes = load_model(str(folder)).notes
    assert any("use_lu_lambdas=True, lower_order_final=False" in note for note in notes), notes
    config.update(use_lu_lambdas=False, final_sigmas_type="zero")  # lower_order_final: no effect then
    path.write_text(json.dumps(config))
    assert not any("scheduler_config.json asks" in note for note in load_model(str(folder)).notes)

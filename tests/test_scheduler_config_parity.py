"""A scheduler_config.json's sampling keys give diffusers' schedule: DDIM / DDPM "linspace" timesteps (rounded)."""
import numpy as np
import pytest
from helpers import SD15_SCHEDULER, SHAPE, assert_close_to_ref, diffusers_scheduler, run_diffusers, run_ours

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from ldm.diffusion import sampling_plan  # noqa: E402


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

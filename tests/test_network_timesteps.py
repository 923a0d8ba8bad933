"""The timestep a discrete model's network sees at every sigma a sampler evaluates is the peers' (docs/samplers.md,
"The network's timesteps"): diffusers' at a plan's sigmas (its spaced timesteps, or those of Karras sigmas rounded or
truncated as each scheduler does) and diffusers' / k-diffusion's log-sigma interpolation anywhere else: the
midpoints of dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral and dpmpp_sde, and every stage of dpm_fast / dpm_adaptive.

Before: dpm_fast / dpm_adaptive and the midpoints of "model" plans fed the exact inverse of the linear sigma(t), up to
5e-3 of a timestep from the peers (dpm_fast 3.6e-6, dpm_adaptive 3.2e-4 relative from k-diffusion's sample; dpm_2
1.0e-5 from diffusers'); KDPM2's Karras timesteps were unrounded (1.9e-4); DPM-Solver's on the cosine schedule
rounded where diffusers truncates (1.3e-2)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SD15_SCHEDULER, SHAPE, assert_close_to_ref, diffusers_scheduler, run_diffusers, run_ours

from ldm.diffusion import SAMPLERS, DiscreteDenoiser, DiscreteSchedule, ScheduleConfig, sample_euler, sampling_plan
from ldm.diffusion.sampler_registry import SamplerSpec, register_sampler
from ldm.errors import LdmError

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

COSINE = {**SD15_SCHEDULER, "beta_schedule": "squaredcos_cap_v2", "steps_offset": 0}  # DeepFloyd IF's schedule


class RecordingNet:
    """An eps network of N(0.3, 0.8^2) data that reads its noise level from the float32 timestep it is given (as a
    real U-Net does), recording each timestep."""

    def __init__(self, schedule: DiscreteSchedule):
        self.sigmas = schedule.sigmas.double().numpy()
        self.seen = []

    def __call__(self, x_in, t, **cond):
        t = torch.as_tensor(t).float().double().reshape(-1).expand(x_in.shape[0])
        self.seen.append(float(t[0]))
        sigma = torch.from_numpy(np.interp(t.numpy(), np.arange(len(self.sigmas)), self.sigmas)).view(-1, 1, 1, 1)
        x = x_in.double() * (1 + sigma**2).sqrt()
        return ((x - 0.3) * sigma / (0.64 + sigma**2)).to(x_in.dtype)


def log_sigma_timestep(schedule: DiscreteSchedule, sigma: float) -> float:
    """diffusers' `_sigma_to_t` (k-diffusion's CompVisDenoiser.sigma_to_t is the same interpolation)."""
    sigmas = schedule.sigmas.float().numpy()
    return float(diffusers.EulerDiscreteScheduler._sigma_to_t(None, np.array(sigma), np.log(sigmas)))


def run_recorded(sampler: str, steps: int, sigmas: str = "model", config=SD15_SCHEDULER, **options):
    """(the sample, the sigmas the denoiser was asked at, the timesteps its network saw) through the plan."""
    schedule_config = ScheduleConfig.from_diffusers(config)
    schedule = DiscreteSchedule.from_config(schedule_config)
    net = RecordingNet(schedule)
    plan = sampling_plan(schedule_config, sampler, steps, sigmas)
    denoiser = plan.with_network_timesteps(DiscreteDenoiser(net, schedule))
    asked = []

    def recording(x, sigma, cond):
        asked.append(float(sigma[0]))
        return denoiser(x, sigma, cond)

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * plan.init_noise_scale
    out = SAMPLERS[sampler](recording, x, plan.sigmas.double(), None, generator=torch.Generator().manual_seed(6),
                            **options)
    return out, plan, schedule, asked, net.seen


@pytest.mark.parametrize("sampler, options", [("dpm_fast", {}), ("dpm_adaptive", {"rtol": 1e-3, "atol": 1e-4})])
def test_dpm_fast_and_adaptive_feed_the_log_sigma_timestep_at_every_sigma(sampler, options):
    """k-diffusion's SD wrapper (how A1111 runs them) interpolates log sigma: ours now too, at every stage (the
    linear inverse of sigma(t) was up to 5e-3 of a timestep away)."""
    _, _, schedule, asked, seen = run_recorded(sampler, 12, **options)
    expected = [log_sigma_timestep(schedule, sigma) for sigma in asked]
    linear = [float(schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float64))) for sigma in asked]
    assert len(seen) > 12 if sampler == "dpm_adaptive" else len(seen) == 12
    np.testing.assert_allclose(seen, expected, rtol=0, atol=1e-4)  # float32 timesteps: 6e-5 at t ~ 999
    assert max(abs(a - b) for a, b in zip(linear, expected)) > 1e-3  # (what the old map fed: the test tells them apart)


@pytest.mark.parametrize("sampler, sigmas", [("dpmpp_2s_ancestral", "model"), ("dpm_2_ancestral", "model"),
                                             ("dpm_2_ancestral", "karras"), ("dpm_2", "model"), ("dpmpp_sde", "model")])
def test_midpoints_see_the_log_sigma_timestep_and_plan_sigmas_the_plans(sampler, sigmas):
    """Calls alternate: a plan sigma (its plan timestep: diffusers' spaced one, KDPM2's rounded Karras one) and a
    midpoint (the log-sigma one), also where the midpoint is the next plan sigma itself, as at eta 1 in the ancestral
    samplers (sqrt(sigma sigma_down) = sigma_next): diffusers' KDPM2 ancestral scheduler feeds 868.42 there and 868 at
    the step's own call at that sigma."""
    _, plan, schedule, asked, seen = run_recorded(sampler, 7, sigmas)
    main, mid = seen[0::2], seen[1::2]
    plan_t = plan.timesteps.double().tolist()
    np.testing.assert_array_equal(main, plan_t[:len(main)])
    np.testing.assert_allclose(mid, [log_sigma_timestep(schedule, s) for s in asked[1::2]], rtol=0, atol=1e-4)
    if sampler != "dpmpp_sde" and sampler != "dpm_2":  # eta 1: each midpoint is the next plan sigma
        assert asked[1::2] == pytest.approx(plan.sigmas[1:len(mid) + 1].double().tolist(), rel=1e-6)
        assert max(abs(a - b) for a, b in zip(mid, plan_t[1:])) > (0.1 if sigmas == "karras" else 1e-4)


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_ancestral"])
def test_kdpm2_rounds_the_timesteps_of_karras_sigmas(sampler):
    """KDPM2DiscreteScheduler and its ancestral twin round them (not those of exponential or beta sigmas); Euler,
    Heun, LMS and DPMSolverSDE keep them unrounded."""
    scheduler = diffusers_scheduler(sampler, {**SD15_SCHEDULER, "use_karras_sigmas": True})
    scheduler.set_timesteps(7)
    plan = sampling_plan(SD15_SCHEDULER, sampler, 7, "karras")
    np.testing.assert_array_equal(plan.timesteps.double().numpy(), scheduler.timesteps[0::2].double().numpy())
    assert torch.equal(plan.timesteps, plan.timesteps.round())
    assert not torch.equal(sampling_plan(SD15_SCHEDULER, "euler", 7, "karras").timesteps, plan.timesteps)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc"])
def test_karras_timesteps_on_the_cosine_schedule_are_diffusers_own(sampler):
    """DPMSolverMultistepScheduler truncates them on squaredcos_cap_v2 (an int64 cast of unrounded values: sigma_max's
    999 becomes 998); UniPC rounds them on every schedule."""
    scheduler = diffusers_scheduler(sampler, {**COSINE, "use_karras_sigmas": True})
    scheduler.set_timesteps(8)
    plan = sampling_plan(COSINE, sampler, 8, "karras")
    assert plan.timesteps.dtype == scheduler.timesteps.dtype and torch.equal(plan.timesteps, scheduler.timesteps)
    assert plan.timesteps[0] == (999 if sampler == "unipc" else 998)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_cosine_karras_loops_match_diffusers(sampler):
    """With the rounded timesteps they were 1.3e-2 apart (8 steps); now float32 rounding at sigma_max = 2e4 (3.4e-6,
    7.0e-6 measured; unipc's, unchanged, 3.5e-6). IFPipeline sets the scheduler's begin index (`run_diffusers` too):
    the repeated first timestep 998 would otherwise start its step count at the repeat."""
    ref, ref_t = run_diffusers(sampler, {**COSINE, "use_karras_sigmas": True}, 8, SHAPE, seed=1)
    ours, our_t = run_ours(sampler, COSINE, 8, SHAPE, seed=1, sigmas="karras")
    assert our_t == ref_t
    assert_close_to_ref(ours, ref, rel=2e-5)


def test_an_unknown_karras_timesteps_rule_is_refused():
    with pytest.raises(LdmError, match="karras_timesteps must be one of unrounded, rounded, rounded_except_cosine"):
        register_sampler(SamplerSpec("euler_rounded", sample_euler, "euler_discrete", "linspace",
                                     karras_timesteps="floor"))


# --- against k-diffusion 0.1.1.post1 where it is importable (tools/parity_kdiffusion.py) -----------------------------

@pytest.fixture(scope="module")
def kd():
    if "k_diffusion.sampling" not in sys.modules and importlib.util.find_spec("k_diffusion") is None:
        pytest.skip("k-diffusion is not importable (pip install --target DIR --no-deps k-diffusion; PYTHONPATH=DIR)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import parity_kdiffusion

    sampling = parity_kdiffusion.load_kdiffusion_sampling()
    spec = importlib.util.spec_from_file_location("k_diffusion.external",
                                                  Path(sampling.__file__).with_name("external.py"))
    external = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(external)
    return sampling, external


@pytest.mark.parametrize("sampler, options", [("dpm_fast", {}), ("dpm_adaptive", {}),
                                              ("dpm_adaptive", {"rtol": 1e-3, "atol": 1e-4})])
def test_dpm_fast_and_adaptive_are_k_diffusions_on_its_sd_wrapper(kd, sampler, options):
    """The whole sample against k-diffusion's on its DiscreteEpsDDPMDenoiser (A1111's CompVisDenoiser), both networks
    reading float32 timesteps. Its log table is torch's float32 log, 1 ulp from numpy's (diffusers', ours) at 170 of
    SD's 1000 sigmas: with numpy's in it the two agree to 1e-16; with its own, dpm_fast to 1.5e-8 and dpm_adaptive,
    whose step-size control amplifies it, to ~1e-4 (before: 3.6e-6 and 3.2e-4 with the numpy table too)."""
    sampling, external = kd
    ours, plan, schedule, _, _ = run_recorded(sampler, 10, **options)
    alphas_cumprod = schedule.alphas_cumprod.float()
    theirs_denoiser = external.DiscreteEpsDDPMDenoiser(RecordingNet(schedule), alphas_cumprod, quantize=False)
    theirs_denoiser.log_sigmas = torch.from_numpy(np.log(theirs_denoiser.sigmas.numpy()))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * plan.init_noise_scale
    sigma_min, sigma_max = float(plan.sigmas[-1]), float(plan.sigmas[0])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion builds its times with torch.tensor
    try:
        if sampler == "dpm_fast":
            theirs = sampling.sample_dpm_fast(theirs_denoiser, x, sigma_min, sigma_max, 10, disable=True)
        else:  # k-diffusion sizes a batch's steps together, ours per image: one image
            ours = ours[:1]
            theirs = sampling.sample_dpm_adaptive(theirs_denoiser, x[:1], sigma_min, sigma_max, disable=True,
                                                  **options)
    finally:
        torch.set_default_dtype(default)
    assert_close_to_ref(ours, theirs, rel=1e-12, floor=0)


def test_the_plan_timesteps_are_copied_to_the_device_once_not_at_every_step(monkeypatch):
    """A host-to-device copy of pageable memory waits for the GPU: the table goes to each device once."""
    schedule = DiscreteSchedule.from_config(ScheduleConfig.from_diffusers(SD15_SCHEDULER))
    plan = sampling_plan(SD15_SCHEDULER, "euler", 4)
    base = DiscreteDenoiser(lambda x, t, **c: x * 0, schedule)
    denoiser = plan.with_network_timesteps(base)
    sigmas, timesteps = denoiser.timesteps
    copies = []
    for tensor in (sigmas, timesteps):
        real = tensor.to
        monkeypatch.setattr(tensor, "to", lambda *a, real=real, **k: copies.append(a) or real(*a, **k), raising=False)
    for sigma in plan.sigmas[:-1]:
        t = denoiser.noise_input(torch.full((2,), float(sigma)))
        assert torch.equal(t, plan.timesteps[plan.sigmas[:-1].tolist().index(float(sigma))].expand(2).float())
    assert len(copies) == 2  # sigmas and timesteps, once each

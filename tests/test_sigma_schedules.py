"""A per-generation sigma schedule (`--sigmas karras|exponential|beta`, `pipe(..., sigmas=...)`): the image of diffusers'
scheduler `from_config(config, use_karras_sigmas=True)` ("DPM++ 2M Karras"), `use_exponential_sigmas=True` or
`use_beta_sigmas=True`, for the samplers whose diffusers scheduler reads that key; the others refuse it before the model
loads.

Where the loops used to part (exponential sigmas under Euler, Heun, LMS: 5e-6 relative): diffusers derives the
timestep it feeds the network from each converted sigma by interpolating log sigma between training timesteps (its
`_sigma_to_t`, over float32 logs); ldm fed the exact inverse of its sigma(t), which is linear in sigma. Between
timesteps t and t + 1 the two differ by about w (1 - w) / 2 * log(sigma_t+1 / sigma_t) of a timestep: ~6e-4 at the
Karras sigmas' 889.5 (adjacent sigmas 0.5% apart), ~7e-3 at the exponential sigmas' 4.8 (10% apart, where exponential
sigmas crowd), and the network's output moves with its timestep input. Not float32 rounding: the plan now carries
diffusers' timesteps (`SamplingPlan.network_timesteps`, `DiscreteDenoiser.at_timesteps`), the network sees the very
same ones, and every loop agrees to ~1e-7 again."""
import json

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
    patch_everywhere,
    run_cli,
    run_diffusers,
    run_ours,
)
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from ldm.cli import eval as eval_cli  # noqa: E402
from ldm.cli import txt2img  # noqa: E402
from ldm.diffusion import sampling_plan  # noqa: E402
from ldm.diffusion.sampler_registry import SIGMA_SCHEDULES, sampler_names, sigma_samplers  # noqa: E402
from ldm.diffusion.schedules import ScheduleConfig, beta_sigmas  # noqa: E402
from ldm.errors import ConfigError, LdmError  # noqa: E402
from ldm.pipeline.images import read_png_parameters  # noqa: E402
from ldm.pipeline.load import load_pipeline  # noqa: E402

CONVERTING_SAMPLERS = ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "dpm_2", "dpm_2_ancestral",
                       "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_3m_sde"]
SCHEDULES = ["karras", "exponential", "beta"]  # the --sigmas choices besides "model"
PROMPT = "a red circle on the left"
# The samplers whose diffusers loop is compared (dpmpp_2s_ancestral has no diffusers peer; dpmpp_3m_sde's third-order
# step differs on purpose, docs/samplers.md). Midpoint samplers call the network between the plan's sigmas too.
LOOP_SAMPLERS = ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "dpm_2", "dpm_2_ancestral", "dpmpp_sde"]
MIDPOINT = {"dpm_2", "dpm_2_ancestral", "dpmpp_sde"}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_samplers_that_take_a_sigma_schedule_are_those_whose_diffusers_scheduler_reads_its_key(schedule):
    assert SIGMA_SCHEDULES[schedule] == f"use_{schedule}_sigmas"
    assert set(sigma_samplers(schedule)) == set(CONVERTING_SAMPLERS)
    # (dpm_fast and dpm_adaptive walk the model's whole sigma range: only its ends matter)
    assert set(sampler_names()) - set(sigma_samplers(schedule)) == {"ddim", "ddpm", "euler_a", "dpm_fast",
                                                                     "dpm_adaptive"}
    assert set(sigma_samplers("model")) == set(sampler_names())
    for sampler in CONVERTING_SAMPLERS[:7]:  # those with a diffusers peer: each scheduler really reads the key
        scheduler = diffusers_scheduler(sampler, SD15_SCHEDULER)
        assert SIGMA_SCHEDULES[schedule] in scheduler.config, (sampler, type(scheduler).__name__)
    for sampler in ("ddim", "ddpm", "euler_a"):
        assert SIGMA_SCHEDULES[schedule] not in diffusers_scheduler(sampler, SD15_SCHEDULER).config


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", CONVERTING_SAMPLERS)
def test_sigmas_choice_is_the_plan_of_a_config_with_its_key(sampler, schedule):
    asked = sampling_plan(SD15_SCHEDULER, sampler, 8, schedule)
    configured = sampling_plan({**SD15_SCHEDULER, SIGMA_SCHEDULES[schedule]: True}, sampler, 8)
    plain = sampling_plan(SD15_SCHEDULER, sampler, 8, "model")
    assert torch.equal(asked.sigmas, configured.sigmas) and torch.equal(asked.timesteps, configured.timesteps)
    assert asked.network_timesteps == configured.network_timesteps and asked.init_noise_scale == configured.init_noise_scale
    assert asked.network_timesteps and plain.network_timesteps  # the network sees each plan's own timesteps
    assert not torch.equal(asked.timesteps, plain.timesteps)
    assert not torch.allclose(asked.sigmas, plain.sigmas)
    # a choice replaces a config's own converted sigmas (diffusers allows one kind at a time)
    other = next(s for s in SCHEDULES if s != schedule)
    overridden = sampling_plan({**SD15_SCHEDULER, SIGMA_SCHEDULES[other]: True}, sampler, 8, schedule)
    assert torch.equal(overridden.sigmas, asked.sigmas) and torch.equal(overridden.timesteps, asked.timesteps)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", ["euler", "heun", "lms", "dpmpp_2m", "unipc"])
def test_plan_sigmas_and_timesteps_are_diffusers_own(sampler, schedule):
    """Bit for bit: diffusers' scheduler.sigmas and the timesteps it feeds the network (float for Euler and kin,
    int64 for DPM-Solver and UniPC: rounded for Karras, truncated for exponential and beta, whose sigma_max then gets
    timestep 998)."""
    scheduler = diffusers_scheduler(sampler, {**SD15_SCHEDULER, SIGMA_SCHEDULES[schedule]: True})
    scheduler.set_timesteps(8)
    plan = sampling_plan(SD15_SCHEDULER, sampler, 8, schedule)
    theirs_sigmas, theirs_t = scheduler.sigmas, scheduler.timesteps
    if sampler == "heun":  # each sigma but the first twice (the second-order call at the next sigma)
        theirs_sigmas = torch.cat([theirs_sigmas[:1], theirs_sigmas[1::2]])
        theirs_t = theirs_t[::2]
    assert torch.equal(plan.sigmas, theirs_sigmas)
    assert plan.timesteps.dtype == theirs_t.dtype and torch.equal(plan.timesteps, theirs_t)
    if sampler in ("dpmpp_2m", "unipc") and schedule != "karras":
        assert plan.timesteps[0] == 998


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", LOOP_SAMPLERS)
def test_sigmas_choice_matches_diffusers_from_config_with_its_key(sampler, schedule):
    """The scheduler loop alone: ours with sigmas=<schedule> on a plain SD-1.5 config is diffusers' scheduler built
    with `from_config(config, use_<schedule>_sigmas=True)`, the network called at the very same timesteps."""
    ref, ref_t = run_diffusers(sampler, {**SD15_SCHEDULER, SIGMA_SCHEDULES[schedule]: True}, 8, SHAPE, seed=1)
    ours, our_t = run_ours(sampler, SD15_SCHEDULER, 8, SHAPE, seed=1, sigmas=schedule)
    if sampler in MIDPOINT:  # diffusers computes a midpoint sigma in float32 torch, ours in float64: ~3e-5 apart
        np.testing.assert_allclose(our_t, ref_t, rtol=0, atol=2e-4)
    else:
        assert our_t == ref_t
    # measured 7.8e-8 .. 5.6e-7 (dpm_2_ancestral with beta: 1.5e-6); with the linear inverse of sigma(t) as the
    # network's timestep, exponential was 4.6e-6 .. 6.9e-6 (Euler, Heun, LMS; module docstring), and KDPM2's Karras
    # loops 5e-5 .. 1.9e-4 while ours left the timesteps KDPM2 rounds unrounded (skipped then)
    assert_close_to_ref(ours, ref, rel=3e-6)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler_a"])
def test_samplers_without_the_key_refuse_the_schedule_naming_those_that_take_it(sampler, schedule):
    with pytest.raises(ConfigError, match=rf"--sigmas {schedule} does not apply to {sampler}: its diffusers scheduler "
                                          rf"has no use_{schedule}_sigmas; the samplers that take it are euler, "):
        sampling_plan(SD15_SCHEDULER, sampler, 8, schedule)
    with pytest.raises(ConfigError, match="not a sigma schedule"):
        sampling_plan(SD15_SCHEDULER, "euler", 8, "exponentional")


def test_beta_sigmas_are_beta_quantiles_between_the_ends():
    """Beta(0.6, 0.6) quantiles: the ends exactly, symmetric about the middle, denser near both ends."""
    scipy_stats = pytest.importorskip("scipy.stats")
    sigmas = beta_sigmas(9, 0.03, 14.6, dtype=torch.float64)
    assert sigmas[0] == 14.6 and sigmas[-2] == pytest.approx(0.03, abs=1e-15) and sigmas[-1] == 0 and len(sigmas) == 10
    q = (sigmas[:-1] - 0.03) / (14.6 - 0.03)
    np.testing.assert_allclose(scipy_stats.beta.cdf(q.numpy(), 0.6, 0.6), np.linspace(1, 0, 9), atol=1e-12)
    np.testing.assert_allclose((q + q.flip(0)).numpy(), 1.0, atol=1e-12)
    gaps = -q.diff()
    assert gaps[0] < gaps[4] and gaps[-1] < gaps[4]


def test_a_config_may_ask_for_one_kind_of_converted_sigmas_only():
    with pytest.raises(ConfigError, match="use_karras_sigmas and use_beta_sigmas are both set"):
        ScheduleConfig.from_diffusers({**SD15_SCHEDULER, "use_karras_sigmas": True, "use_beta_sigmas": True})


@pytest.mark.parametrize("schedule", ["exponential", "beta"])
def test_an_edm_model_refuses_exponential_and_beta_sigmas(schedule):
    edm = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}
    assert torch.equal(sampling_plan(edm, "euler", 6, "karras").sigmas, sampling_plan(edm, "euler", 6).sigmas)
    with pytest.raises(ConfigError, match=f"--sigmas {schedule} does not apply to an EDM model"):
        sampling_plan(edm, "euler", 6, schedule)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny diffusers SD folder with SD-1.5's (non-Karras) scheduler config, and its diffusers pipeline."""
    return diffusers_sd_folder(tmp_path_factory, diffusers.StableDiffusionPipeline)


@pytest.fixture(scope="module")
def ours(sd_folder):
    return load_pipeline(sd_folder[0], device="cpu")


def _diffusers_image(folder, reference, sampler: str, schedule: str, seed: int = 7) -> np.ndarray:
    """diffusers' image with the folder's scheduler config and `from_config(..., use_<schedule>_sigmas=True)`."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    reference.scheduler = diffusers_scheduler(sampler, {**config, SIGMA_SCHEDULES[schedule]: True})
    return reference(PROMPT, negative_prompt="blurry", num_inference_steps=8, guidance_scale=5.0, height=32, width=32,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


@pytest.mark.parametrize("sampler, schedule", [("dpmpp_2m", "karras"), ("euler", "karras"), ("heun", "karras"),
                                               ("dpmpp_2m", "exponential"), ("euler", "exponential"),
                                               ("dpmpp_2m", "beta"), ("lms", "beta")])
def test_pipe_sigmas_choice_gives_diffusers_image(sd_folder, ours, sampler, schedule):
    folder, reference = sd_folder
    expected = _diffusers_image(folder, reference, sampler, schedule)
    # the folder's own config has none: the call asks for them
    assert not any(getattr(ours.schedule_config, key) for key in list(SIGMA_SCHEDULES.values())[1:])
    image = ours(PROMPT, "blurry", sampler=sampler, steps=8, guidance=5.0, seed=7, height=32, width=32,
                 sigmas=schedule)[0]
    assert_same_image(image, expected, f"{sampler} --sigmas {schedule}")
    plain = ours(PROMPT, "blurry", sampler=sampler, steps=8, guidance=5.0, seed=7, height=32, width=32)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(image))


def test_pipe_refuses_converted_sigmas_for_ddim_and_euler_a_and_an_unknown_schedule(ours):
    with pytest.raises(LdmError, match="--sigmas karras does not apply to ddim.*euler"):
        ours(PROMPT, sampler="ddim", steps=2, height=32, width=32, sigmas="karras")
    with pytest.raises(LdmError, match="--sigmas exponential does not apply to euler_a.*heun"):
        ours(PROMPT, sampler="euler_a", steps=2, height=32, width=32, sigmas="exponential")
    with pytest.raises(LdmError, match="not a sigma schedule"):
        ours(PROMPT, sampler="euler", steps=2, height=32, width=32, sigmas="Karras")


@pytest.mark.parametrize("sampler, schedule", [("dpmpp_2m", "karras"), ("euler", "exponential"), ("unipc", "beta")])
def test_cli_sigmas_choice_is_the_pipes_image_and_recorded(sd_folder, ours, tmp_path, capsys, sampler, schedule):
    out = tmp_path / "out"
    code, err = run_cli(txt2img.main, [PROMPT, "--model", sd_folder[0], "--sampler", sampler, "--sigmas", schedule,
                                       "--steps", "8", "--guidance", "5", "--seed", "7", "--height", "32", "--width",
                                       "32", "--negative-prompt", "blurry", "--out", out], capsys)
    assert code == 0, err
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert record["sigmas"] == schedule and read_png_parameters(out / record["file_name"]) == record
    expected = ours(PROMPT, "blurry", sampler=sampler, steps=8, guidance=5.0, seed=7, height=32, width=32,
                    sigmas=schedule)[0]
    assert np.array_equal(np.asarray(Image.open(out / record["file_name"]).convert("RGB")), np.asarray(expected))


def _no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --sigmas was checked")

    patch_everywhere(monkeypatch, "ldm.pipeline.load.load_pipeline", refuse)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("argv", [["--sampler", "ddim"], ["--sampler", "euler_a"]])
def test_cli_refuses_a_sigma_schedule_for_a_sampler_without_it_before_loading(monkeypatch, tmp_path, capsys, argv,
                                                                               schedule):
    _no_model_load(monkeypatch)
    code, err = run_cli(txt2img.main, ["a cat", *argv, "--sigmas", schedule, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"--sigmas {schedule} does not apply" in err and "dpmpp_2m" in err, err
    code, err = run_cli(txt2img.main, ["a cat", "--sigmas", "exponentional", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "--sigmas" in err


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_eval_refuses_a_sigma_schedule_for_ddim_before_loading(monkeypatch, tmp_path, capsys, schedule):
    _no_model_load(monkeypatch)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    code, err = run_cli(eval_cli.main, ["--model", "default", "--prompts", prompts, "--samplers", "ddim", "--steps", "2",
                                        "--guidance", "3", "--sigmas", schedule, "--out", tmp_path / "eval"], capsys)
    assert code == 2 and f"--sigmas {schedule} does not apply to ddim" in err, err


def test_eval_sigmas_karras_generates_the_pipes_images_and_reports_them(tiny_sd_folder, tiny_clip_config, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "eval"
    assert eval_cli.main([str(a) for a in ["--model", tiny_sd_folder, "--prompts", prompts, "--samplers", "dpmpp_2m",
                                           "--steps", "3", "--guidance", "1", "--height", "16", "--width", "16",
                                           "--sigmas", "karras", "--clip-model", tiny_clip_config,
                                           "--clip-pretrained", "none", "--out", out]]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [run["settings"]["sigmas"] for run in report["runs"]] == ["karras"]
    folder = next((out / "samples").iterdir())
    assert folder.name.endswith("-karras")
    record = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
    pipe = load_pipeline(tiny_sd_folder, device="cpu")
    kwargs = dict(sampler="dpmpp_2m", steps=3, guidance=1.0, height=16, width=16)
    karras = np.asarray(pipe.batch(["a red circle"], [record["seed"]], sigmas="karras", **kwargs)[0], dtype=int)
    plain = np.asarray(pipe.batch(["a red circle"], [record["seed"]], **kwargs)[0], dtype=int)
    image = np.asarray(Image.open(folder / record["file_name"]).convert("RGB"), dtype=int)
    assert np.abs(image - karras).max() <= 1 and np.abs(image - plain).max() > 1

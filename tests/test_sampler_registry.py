"""The sampler registry: a sampler added through it alone is reachable, with its options, from the CLI and pipeline."""
import inspect
import json
import math

import pytest
import torch

from ldm.cli.txt2img import main
from ldm.diffusion import plans
from ldm.diffusion.sampler_registry import (
    OPTION_RANGES,
    SAMPLERS,
    TIMESTEP_KINDS,
    SamplerSpec,
    check_option_values,
    check_sampler_options,
    get_sampler,
    register_sampler,
    run_sampler,
    sampler_names,
    unregister_sampler,
)
from ldm.diffusion.plans import SamplingPlan, sampling_plan
from ldm.diffusion.samplers import sample_euler
from ldm.errors import ConfigError, LdmError
from ldm.pipeline.images import read_png_parameters
from ldm.pipeline.load import load_pipeline

SD15 = {"beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False}


@pytest.fixture
def toy():
    """A toy sampler (Euler whose step is scaled by `foo`) that records the options it was called with."""
    calls = []

    def sample_toy(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                   foo=1.0, sigmas_next=None):
        calls.append({"foo": foo, "sigmas_next": sigmas_next, "sigmas": sigmas.tolist()})
        sigmas = sigmas.tolist()
        for i in range(len(sigmas) - 1):
            denoised = denoiser(x, torch.full((x.shape[0],), sigmas[i]), cond)
            x = x + foo * (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    register_sampler(SamplerSpec("toy", sample_toy, "euler_discrete", "trailing", {"foo": 1.0}))
    yield calls
    unregister_sampler("toy")


def test_every_entry_is_consistent_with_its_function_and_plan():
    assert set(plans._KIND_PLANS) == set(TIMESTEP_KINDS)
    assert {"unipc", "lms", "ddim", "euler_a", "heun", "dpmpp_2m_sde"} <= set(sampler_names()) == set(SAMPLERS)
    for name in sampler_names():
        spec = get_sampler(name)
        params = inspect.signature(spec.function).parameters
        for option, default in spec.options.items():  # the registry's defaults are the function's own
            assert params[option].default == default, (name, option)
    assert dict(get_sampler("heun").options) == {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
    assert dict(get_sampler("euler_a").options) == {"eta": 1.0, "s_noise": 1.0}


def test_unknown_sampler_and_options_name_the_choices():
    with pytest.raises(LdmError, match="unknown sampler 'plms'; choose one of ddpm, ddim, .*unipc"):
        get_sampler("plms")
    with pytest.raises(ConfigError, match=r"unknown sampler option 'churn'; sampler 'heun' takes s_churn \(default "
                                          r"0.0\), s_tmin .* s_noise"):
        check_sampler_options("heun", {"churn": 1.0})
    with pytest.raises(ConfigError, match="sampler 'dpmpp_2m' takes no options"):
        check_sampler_options("dpmpp_2m", {"eta": 1.0})
    for bad in (math.nan, math.inf, "0.5", True):
        with pytest.raises(ConfigError, match="must be a finite number"):
            check_sampler_options("ddim", {"eta": bad})
    with pytest.raises(ConfigError, match="whole number"):
        check_sampler_options("lms", {"order": 2.5})
    assert check_sampler_options("lms", {"order": 3.0}) == {"order": 3}
    assert check_sampler_options("euler_a", {"eta": 0}) == {"eta": 0.0}
    assert check_sampler_options("euler_a", None) == {}


def test_registering_checks_the_entry(toy):
    with pytest.raises(LdmError, match="already registered"):
        register_sampler(get_sampler("toy"))
    with pytest.raises(LdmError, match="'bar' is not a keyword of sample_toy"):
        register_sampler(SamplerSpec("toy2", get_sampler("toy").function, "euler_discrete", "linspace", {"bar": 1.0}))
    with pytest.raises(LdmError, match="timestep_kind must be one of"):
        register_sampler(SamplerSpec("toy2", sample_euler, "karras", "linspace"))
    with pytest.raises(LdmError, match="not a keyword"):  # plan keywords are never user options
        register_sampler(SamplerSpec("toy2", get_sampler("toy").function, "euler_discrete", "linspace",
                                     {"sigmas_next": 0.0}))
    assert "toy2" not in SAMPLERS


def test_run_sampler_passes_defaults_then_user_options_then_plan_keywords(toy):
    plan = SamplingPlan(torch.tensor([2.0, 1.0, 0.0]), 2.0, 1.0, torch.tensor([10, 5]),
                        {"sigmas_next": torch.tensor([1.5, 0.0])})
    x = torch.ones(1, 1)
    run_sampler("toy", lambda x, sigma, cond: torch.zeros_like(x), x, plan)
    run_sampler("toy", lambda x, sigma, cond: torch.zeros_like(x), x, plan, options={"foo": 0.5})
    assert [c["foo"] for c in toy] == [1.0, 0.5]
    assert toy[0]["sigmas_next"] is plan.sampler_kwargs["sigmas_next"] and toy[0]["sigmas"] == [2.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="sampler 'toy' takes foo"):
        run_sampler("toy", lambda x, sigma, cond: x, x, plan, options={"eta": 1.0})


def test_sampling_plan_reads_the_entry(toy):
    """The toy entry's default spacing ("trailing") and timestep kind decide its plan."""
    toy_plan = sampling_plan(SD15, "toy", 4)
    assert toy_plan.timesteps.tolist() == [999, 749, 499, 249]
    euler = sampling_plan({**SD15, "timestep_spacing": "trailing"}, "euler", 4)
    assert torch.equal(toy_plan.sigmas, euler.sigmas) and toy_plan.init_noise_scale == euler.init_noise_scale
    with pytest.raises(LdmError, match="unknown sampler"):
        sampling_plan(SD15, "plms", 4)


@pytest.mark.slow
def test_toy_sampler_is_reachable_from_the_cli_with_its_option(toy, tiny_sd_folder, tmp_path):
    out = tmp_path / "out"
    code = main(["a red circle", "--model", str(tiny_sd_folder), "--sampler", "toy", "--sampler-option", "foo=2",
                 "--steps", "3", "--height", "16", "--width", "16", "--out", str(out)])
    assert code == 0
    assert [c["foo"] for c in toy] == [2.0]
    assert len(toy[0]["sigmas"]) == 4  # 3 steps of the toy's own plan
    record = json.loads((out / "metadata.jsonl").read_text())
    assert record["sampler"] == "toy" and record["sampler_options"] == {"foo": 2.0}
    assert read_png_parameters(out / record["file_name"])["sampler_options"] == {"foo": 2.0}


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "euler_a", "--sampler-option", "churn=1"],
     "unknown sampler option 'churn'; sampler 'euler_a' takes eta (default 1.0), s_noise (default 1.0)"),
    (["--sampler", "ddim", "--sampler-option", "eta"], "--sampler-option 'eta': write NAME=VALUE"),
    (["--sampler", "ddim", "--sampler-option", "eta=fast"], "write NAME=VALUE with a number"),
    (["--sampler", "ddim", "--sampler-option", "eta=nan"], "must be a finite number"),
    (["--sampler", "plms"], "unknown sampler 'plms'; choose one of"),
])
def test_bad_sampler_options_exit_2_before_anything_is_written(tiny_sd_folder, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["x", "--model", str(tiny_sd_folder), "--steps", "1", "--out", str(out)] + argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def pipe(tiny_sd_folder):
    return load_pipeline(tiny_sd_folder, device="cpu")


def _final_x(pipe, sampler, options=None, **kwargs):
    seen = []
    pipe("a cat", seed=3, steps=3, height=16, width=16, guidance=1.0, sampler=sampler, sampler_options=options or {},
         callback=lambda info: seen.append(info["x"]), **kwargs)
    return seen[-1]


@pytest.mark.slow
def test_euler_a_options_reach_the_sampler_from_the_pipeline(pipe):
    euler = _final_x(pipe, "euler")
    ancestral = _final_x(pipe, "euler_a")
    assert (ancestral - euler).abs().max() > 1e-2
    # eta = 0 removes the fresh noise: Euler a becomes Euler, bit for bit.
    assert torch.equal(_final_x(pipe, "euler_a", {"eta": 0.0}), euler)
    # s_noise = 0 keeps the smaller deterministic step: neither of the two.
    quiet = _final_x(pipe, "euler_a", {"s_noise": 0.0})
    assert (quiet - euler).abs().max() > 1e-3 and (quiet - ancestral).abs().max() > 1e-3


@pytest.mark.slow
def test_heun_churn_options_reach_the_sampler_from_the_pipeline(pipe):
    plain = _final_x(pipe, "heun")
    churned = _final_x(pipe, "heun", {"s_churn": 2.0})
    assert (churned - plain).abs().max() > 1e-3
    # Churn only where s_tmin <= sigma <= s_tmax: a window below every sigma of the plan gives plain Heun back.
    assert torch.equal(_final_x(pipe, "heun", {"s_churn": 2.0, "s_tmax": 1e-3}), plain)
    # s_noise = 0: the raised noise level without fresh noise, so a different sample again.
    no_noise = _final_x(pipe, "heun", {"s_churn": 2.0, "s_noise": 0.0})
    assert (no_noise - churned).abs().max() > 1e-3 and (no_noise - plain).abs().max() > 1e-3


def test_pipeline_rejects_unknown_options(pipe):
    with pytest.raises(ConfigError, match="sampler 'ddim' takes eta"):
        pipe("a cat", steps=1, height=16, width=16, sampler="ddim", sampler_options={"s_churn": 1.0})


def test_dpm_family_is_reachable_from_the_cli_and_the_pipeline(pipe, tiny_sd_folder, tmp_path, capsys):
    """k-diffusion's names reach `ldm-txt2img --sampler` with their options, and the pipeline runs them."""
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = " ".join(capsys.readouterr().out.split())
    assert all(name in listed for name in ("dpm_2,", "dpm_2_ancestral,", "dpmpp_2s_ancestral,", "dpmpp_sde,",
                                           "dpmpp_3m_sde"))
    out = tmp_path / "out"
    assert main(["a red circle", "--model", str(tiny_sd_folder), "--sampler", "dpmpp_sde", "--sampler-option",
                 "r=0.25", "--steps", "2", "--height", "16", "--width", "16", "--out", str(out)]) == 0
    record = json.loads((out / "metadata.jsonl").read_text())
    assert record["sampler"] == "dpmpp_sde" and record["sampler_options"] == {"r": 0.25}
    # eta = 0 takes the noise out of the ancestral DPM-Solver-2: it is dpm_2, bit for bit; the noise matters.
    dpm_2 = _final_x(pipe, "dpm_2")
    assert torch.equal(_final_x(pipe, "dpm_2_ancestral", {"eta": 0.0}), dpm_2)
    assert (_final_x(pipe, "dpm_2_ancestral") - dpm_2).abs().max() > 1e-2


@pytest.mark.parametrize("sampler, options, message", [
    ("ddim", {"eta": -1.0}, r"sampler option eta=-1 is out of range: eta lies in \[0, inf\), the amount of fresh "
                            r"noise per step"),
    ("dpmpp_2m_sde", {"eta": -0.5}, r"eta=-0.5 is out of range: eta lies in \[0, inf\)"),
    ("euler_a", {"s_noise": -1.0}, r"s_noise=-1 is out of range: s_noise lies in \[0, inf\)"),
    ("heun", {"s_churn": -2.0}, r"s_churn=-2 is out of range: s_churn lies in \[0, inf\)"),
    ("euler", {"s_tmin": -1.0}, r"s_tmin=-1 is out of range"),
    ("dpm_2", {"s_tmax": -3.0}, r"s_tmax=-3 is out of range: s_tmax lies in \[0, inf\]"),
    ("heun", {"s_churn": 1.0, "s_tmin": 3.0, "s_tmax": 1.0}, r"s_tmin=3 > s_tmax=1: no noise level lies in the churn "
                                                              r"window"),
    ("dpmpp_sde", {"r": 0.0}, r"r=0 is out of range: r lies in \(0, 1\)"),
    ("dpmpp_sde", {"r": 1.0}, r"r=1 is out of range: r lies in \(0, 1\)"),
    ("ddim", {"eta": -math.inf}, r"eta=-inf must be a finite number"),
])
def test_option_values_without_meaning_are_refused_with_the_range(sampler, options, message):
    with pytest.raises(ConfigError, match=message + rf".*; sampler '{sampler}' takes"):
        check_sampler_options(sampler, options)
    with pytest.raises(ConfigError, match=message):  # the command line checks before the sampler is known
        check_option_values(options)


def test_the_edges_of_each_range_are_accepted():
    """0 is meaningful for every noise option (no noise), eta above 1 too (docs/samplers.md compares eta 1.5)."""
    assert check_sampler_options("ddim", {"eta": 0}) == {"eta": 0.0}
    assert check_sampler_options("dpm_2_ancestral", {"eta": 1.5, "s_noise": 0}) == {"eta": 1.5, "s_noise": 0.0}
    assert check_sampler_options("heun", {"s_churn": 0, "s_tmin": 2, "s_tmax": 2}) == {
        "s_churn": 0.0, "s_tmin": 2.0, "s_tmax": 2.0}  # a window of one noise level
    assert check_sampler_options("euler", {"s_tmin": 5}) == {"s_tmin": 5.0}  # below the default s_tmax = inf
    assert check_sampler_options("dpmpp_sde", {"r": 0.3}) == {"r": 0.3}


def test_a_negative_eta_would_have_broken_the_samplers_and_every_default_lies_in_its_range():
    """Why the ranges: dpmpp_2m_sde with eta < 0 takes the square root of a negative number mid-run."""
    x, sigmas = torch.ones(1, 1, 2, 2), torch.tensor([2.0, 1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="math domain error"):
        get_sampler("dpmpp_2m_sde").function(lambda x, sigma, cond: 0.5 * x, x, sigmas, eta=-1.0,
                                             generator=torch.Generator().manual_seed(0))
    for name in sampler_names():
        for option, default in get_sampler(name).options.items():
            assert option not in OPTION_RANGES or default in OPTION_RANGES[option], (name, option)


def test_registering_refuses_a_default_outside_the_options_range():
    def sample_bad(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True, eta=-1.0):
        return x

    with pytest.raises(LdmError, match=r"option 'eta' has the default -1.0 outside \[0, inf\)"):
        register_sampler(SamplerSpec("bad", sample_bad, "euler_discrete", "linspace", {"eta": -1.0}))
    assert "bad" not in sampler_names()

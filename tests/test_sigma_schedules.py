"""A per-generation sigma schedule (`--sigmas karras`, `pipe(..., sigmas="karras")`): the image of diffusers' scheduler
`from_config(config, use_karras_sigmas=True)` ("DPM++ 2M Karras"), for the samplers whose diffusers scheduler reads
use_karras_sigmas; the others refuse it before the model loads."""
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
from ldm.diffusion.sampler_registry import sampler_names, sigma_samplers  # noqa: E402
from ldm.errors import ConfigError, LdmError  # noqa: E402
from ldm.pipeline.images import read_png_parameters  # noqa: E402
from ldm.pipeline.load import load_pipeline  # noqa: E402

KARRAS_SAMPLERS = ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "dpm_2", "dpm_2_ancestral",
                   "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_3m_sde"]
PROMPT = "a red circle on the left"


def test_the_samplers_that_take_karras_sigmas_are_those_whose_diffusers_scheduler_reads_them():
    assert set(sigma_samplers("karras")) == set(KARRAS_SAMPLERS)
    # (dpm_fast and dpm_adaptive walk the model's whole sigma range: only its ends matter)
    assert set(sampler_names()) - set(sigma_samplers("karras")) == {"ddim", "ddpm", "euler_a", "dpm_fast",
                                                                     "dpm_adaptive"}
    assert set(sigma_samplers("model")) == set(sampler_names())


@pytest.mark.parametrize("sampler", KARRAS_SAMPLERS)
def test_sigmas_karras_is_the_plan_of_a_config_with_use_karras_sigmas(sampler):
    asked = sampling_plan(SD15_SCHEDULER, sampler, 8, "karras")
    configured = sampling_plan({**SD15_SCHEDULER, "use_karras_sigmas": True}, sampler, 8)
    plain = sampling_plan(SD15_SCHEDULER, sampler, 8, "model")
    assert torch.equal(asked.sigmas, configured.sigmas) and torch.equal(asked.timesteps, configured.timesteps)
    assert asked.quantize_timesteps == configured.quantize_timesteps and asked.init_noise_scale == configured.init_noise_scale
    assert not torch.allclose(asked.sigmas, plain.sigmas)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "heun", "lms", "unipc"])
def test_sigmas_karras_matches_diffusers_from_config_use_karras_sigmas(sampler):
    """The scheduler loop alone: ours with sigmas="karras" on a plain SD-1.5 config is diffusers' scheduler built
    with `from_config(config, use_karras_sigmas=True)`."""
    ref, _ = run_diffusers(sampler, {**SD15_SCHEDULER, "use_karras_sigmas": True}, 8, SHAPE, seed=1)
    ours, _ = run_ours(sampler, SD15_SCHEDULER, 8, SHAPE, seed=1, sigmas="karras")
    assert_close_to_ref(ours, ref, rel=2e-6)  # measured 1.5e-7 .. 4e-7


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler_a"])
def test_samplers_without_karras_sigmas_refuse_them_naming_those_that_take_them(sampler):
    with pytest.raises(ConfigError, match=rf"--sigmas karras does not apply to {sampler}.*dpmpp_2m"):
        sampling_plan(SD15_SCHEDULER, sampler, 8, "karras")
    with pytest.raises(ConfigError, match="not a sigma schedule"):
        sampling_plan(SD15_SCHEDULER, "euler", 8, "exponential")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny diffusers SD folder with SD-1.5's (non-Karras) scheduler config, and its diffusers pipeline."""
    return diffusers_sd_folder(tmp_path_factory, diffusers.StableDiffusionPipeline)


@pytest.fixture(scope="module")
def ours(sd_folder):
    return load_pipeline(sd_folder[0], device="cpu")


def _diffusers_image(folder, reference, sampler: str, seed: int = 7) -> np.ndarray:
    """diffusers' image with the folder's scheduler config and `from_config(..., use_karras_sigmas=True)`."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    reference.scheduler = diffusers_scheduler(sampler, {**config, "use_karras_sigmas": True})
    return reference(PROMPT, negative_prompt="blurry", num_inference_steps=8, guidance_scale=5.0, height=32, width=32,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "heun"])
def test_pipe_sigmas_karras_gives_diffusers_karras_image(sd_folder, ours, sampler):
    folder, reference = sd_folder
    expected = _diffusers_image(folder, reference, sampler)
    assert not ours.schedule_config.use_karras_sigmas  # the folder's own config has none: the call asks for them
    image = ours(PROMPT, "blurry", sampler=sampler, steps=8, guidance=5.0, seed=7, height=32, width=32,
                 sigmas="karras")[0]
    assert_same_image(image, expected, f"{sampler} --sigmas karras")
    plain = ours(PROMPT, "blurry", sampler=sampler, steps=8, guidance=5.0, seed=7, height=32, width=32)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(image))


def test_pipe_refuses_karras_sigmas_for_ddim_and_an_unknown_schedule(ours):
    with pytest.raises(LdmError, match="--sigmas karras does not apply to ddim.*euler"):
        ours(PROMPT, sampler="ddim", steps=2, height=32, width=32, sigmas="karras")
    with pytest.raises(LdmError, match="not a sigma schedule"):
        ours(PROMPT, sampler="euler", steps=2, height=32, width=32, sigmas="Karras")


def test_cli_sigmas_karras_is_the_pipes_image_and_recorded(sd_folder, ours, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(txt2img.main, [PROMPT, "--model", sd_folder[0], "--sampler", "dpmpp_2m", "--sigmas", "karras",
                                       "--steps", "8", "--guidance", "5", "--seed", "7", "--height", "32", "--width",
                                       "32", "--negative-prompt", "blurry", "--out", out], capsys)
    assert code == 0, err
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert record["sigmas"] == "karras" and read_png_parameters(out / record["file_name"]) == record
    expected = ours(PROMPT, "blurry", sampler="dpmpp_2m", steps=8, guidance=5.0, seed=7, height=32, width=32,
                    sigmas="karras")[0]
    assert np.array_equal(np.asarray(Image.open(out / record["file_name"]).convert("RGB")), np.asarray(expected))


def _no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --sigmas was checked")

    patch_everywhere(monkeypatch, "ldm.pipeline.load.load_pipeline", refuse)


@pytest.mark.parametrize("argv", [["--sampler", "ddim"], ["--sampler", "euler_a"]])
def test_cli_refuses_karras_sigmas_for_a_sampler_without_them_before_loading(monkeypatch, tmp_path, capsys, argv):
    _no_model_load(monkeypatch)
    code, err = run_cli(txt2img.main, ["a cat", *argv, "--sigmas", "karras", "--out", tmp_path / "out"], capsys)
    assert code != 0 and "--sigmas karras does not apply" in err and "dpmpp_2m" in err, err
    code, err = run_cli(txt2img.main, ["a cat", "--sigmas", "exponentional", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "--sigmas" in err


def test_eval_refuses_karras_sigmas_for_ddim_before_loading(monkeypatch, tmp_path, capsys):
    _no_model_load(monkeypatch)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    code, err = run_cli(eval_cli.main, ["--model", "default", "--prompts", prompts, "--samplers", "ddim", "--steps", "2",
                                        "--guidance", "3", "--sigmas", "karras", "--out", tmp_path / "eval"], capsys)
    assert code != 0 and "--sigmas karras does not apply to ddim" in err, err


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

"""dpm_fast and dpm_adaptive through every door: ldm-txt2img, `pipe(...)`, `pipe.batch` (ldm-eval's path) and
ldm-eval, with their options recorded in the images' metadata; tiny random native SD model."""
import json

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image

from ldm.cli import eval as eval_cli
from ldm.cli.txt2img import main
from ldm.errors import LdmError
from ldm.pipeline import load_pipeline
from ldm.pipeline.images import read_png_parameters

KW = dict(height=16, width=16, guidance=3.0, seed=4)


@pytest.fixture(scope="module")
def pipe(tiny_sd_folder):
    return load_pipeline(tiny_sd_folder, device="cpu")


def _counting():
    """A denoiser wrapper that counts the model evaluations (one per sampler call, CFG's halves together)."""
    calls = []

    def wrap(denoiser):
        def counted(x, sigma, cond):
            calls.append(sigma.max().item())
            return denoiser(x, sigma, cond)
        return counted

    return calls, wrap


def test_dpm_fast_spends_steps_evaluations_from_the_models_sigma_max(pipe):
    calls, wrap = _counting()
    image = pipe("a cat", sampler="dpm_fast", steps=7, wrappers=(wrap,), **KW)[0]
    assert len(calls) == 7 and calls[0] == pytest.approx(pipe.stage.denoiser.sigma_max, rel=1e-5)
    assert min(calls) > pipe.stage.denoiser.sigma_min  # it ends at sigma_min, undenoised, as k-diffusion's does
    assert np.asarray(image).std() > 1.0
    noisy = pipe("a cat", sampler="dpm_fast", steps=7, sampler_options={"eta": 1.0}, **KW)[0]
    assert noisy.tobytes() != image.tobytes()
    assert pipe("a cat", sampler="dpm_fast", steps=7, eta=1.0, **KW)[0].tobytes() == noisy.tobytes()  # seeded
    calls.clear()  # img2img: int(steps * strength) evaluations from the plan's point at timestep 999 * strength
    pipe("a cat", sampler="dpm_fast", steps=10, init_image=Image.new("RGB", (16, 16), (200, 30, 30)), strength=0.5,
         wrappers=(wrap,), **KW)
    assert len(calls) == 5
    assert calls[0] == pytest.approx(pipe.stage.denoiser.schedule.t_to_sigma(torch.tensor(499.5)).item(), rel=1e-5)


def test_dpm_adaptive_options_change_its_work_and_a_batch_image_is_the_image_alone(pipe):
    loose, wrap_loose = _counting()
    tighter, wrap_tighter = _counting()
    options = {"rtol": 0.5, "atol": 0.2}  # loose tolerances, few evaluations: a fast test
    a = pipe("a cat", sampler="dpm_adaptive", sampler_options=options, wrappers=(wrap_loose,), **KW)[0]
    b = pipe("a cat", sampler="dpm_adaptive", sampler_options={"rtol": 0.2, "atol": 0.05}, wrappers=(wrap_tighter,),
             **KW)[0]
    assert len(loose) % 3 == 0 and len(tighter) > len(loose)  # order 3: three evaluations a step; tighter, more
    assert a.tobytes() != b.tobytes()
    assert pipe("a cat", sampler="dpm_adaptive", sampler_options=options, steps=50, **KW)[0].tobytes() == a.tobytes()
    # ldm-eval's batches: per-image step sizes and noise, so a batch holds each (prompt, seed)'s own image. The
    # network may round a last bit differently in a batch of 2, moving a pixel on a rounding boundary by one level;
    # one step size for the batch (k-diffusion's) moved 27% of this image's pixels, by up to 2 levels.
    options = {**options, "eta": 1.0}
    batch = pipe.batch(["a cat", "a red square"], [4, 9], sampler="dpm_adaptive", sampler_options=options,
                       **{k: v for k, v in KW.items() if k != "seed"})
    alone = pipe("a red square", sampler="dpm_adaptive", sampler_options=options, **{**KW, "seed": 9})[0]
    diff = np.abs(np.asarray(batch[1]).astype(int) - np.asarray(alone).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"{(diff > 0).sum()} pixels differ"


def test_cli_records_the_options_and_says_what_steps_does(tiny_sd_folder, pipe, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(main, ["a cat", "--model", tiny_sd_folder, "--sampler", "dpm_adaptive", "--sampler-option",
                               "rtol=0.3", "--sampler-option", "order=2", "--steps", 12, "--height", 16, "--width",
                               16, "--guidance", 3, "--seed", 4, "--out", out], capsys)
    assert code == 0, err
    assert "note: --steps 12 does not set dpm_adaptive's work" in err
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert record["sampler"] == "dpm_adaptive" and record["sampler_options"] == {"rtol": 0.3, "order": 2}
    assert read_png_parameters(out / record["file_name"]) == record
    expected = pipe("a cat", sampler="dpm_adaptive", sampler_options={"rtol": 0.3, "order": 2}, **KW)[0]
    assert np.array_equal(np.asarray(Image.open(out / record["file_name"]).convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "dpm_adaptive", "--sampler-option", "order=4"], "order=4 is not 2 or 3"),
    (["--sampler", "dpm_adaptive", "--sampler-option", "atol=0"], "atol=0 is out of range"),
    (["--sampler", "dpm_fast", "--sampler-option", "rtol=0.1"], "unknown sampler option 'rtol'; sampler 'dpm_fast' "
                                                                "takes eta"),
    (["--sampler", "dpm_fast", "--sigmas", "karras"], "--sigmas karras does not apply to dpm_fast: it walks the "
                                                      "model's whole sigma range"),
])
def test_bad_choices_exit_2_before_the_model_loads(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(main, ["a cat", "--model", tmp_path / "no-such-model", "--out", out, *argv], capsys)
    assert code == 2 and message in err and not out.exists()


def test_the_python_door_refuses_alike(pipe):
    with pytest.raises(LdmError, match="--sigmas karras does not apply to dpm_adaptive"):
        pipe("a cat", sampler="dpm_adaptive", sigmas="karras", **KW)
    with pytest.raises(LdmError, match=r"pcoeff \+ icoeff \+ dcoeff = -1 is not positive"):
        pipe("a cat", sampler="dpm_adaptive", sampler_options={"icoeff": -1.0}, **KW)


def test_ldm_eval_sweeps_them_with_their_options(tiny_sd_folder, tiny_clip_config, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "o"
    argv = ["--model", tiny_sd_folder, "--prompts", prompts, "--samplers", "dpm_fast", "--steps", "4",
            "--guidance", "3", "--height", "16", "--width", "16", "--clip-model", tiny_clip_config,
            "--clip-pretrained", "none", "--out", out, "--sampler-option", "eta=0.5"]
    assert eval_cli.main([str(a) for a in argv]) == 0
    record = json.loads((out / "samples" / "dpm_fast-steps4-cfg3" / "metadata.jsonl").read_text().splitlines()[0])
    assert record["sampler"] == "dpm_fast" and record["sampler_options"] == {"eta": 0.5} and record["steps"] == 4


def test_the_sigmas_help_names_every_sampler_that_refuses_a_sigma_schedule():
    """ldm-txt2img's and ldm-eval's --sigmas help list the samplers that refuse karras / exponential / beta: dpm_fast
    and dpm_adaptive too (the help listed only ddpm, ddim and euler_a)."""
    from ldm.cli.txt2img import build_parser
    from ldm.diffusion.sampler_registry import check_sigmas, samplers_without_sigmas

    refusing = samplers_without_sigmas()
    assert set(refusing) == {"ddim", "ddpm", "euler_a", "dpm_fast", "dpm_adaptive"}
    for name in refusing:
        with pytest.raises(LdmError, match=f"--sigmas beta does not apply to {name}"):
            check_sigmas(name, "beta")
    for parser in (build_parser(), eval_cli.build_parser()):
        (action,) = [a for a in parser._actions if "--sigmas" in a.option_strings]
        assert all(name in action.help for name in refusing), action.help

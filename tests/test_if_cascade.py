"""The DeepFloyd IF cascade through ldm's own doors: ldm-txt2img --model IF-I --upscaler IF-II, IF's defaults, one T5
embedding for both stages, and every sampler and guidance wrapper on an IF stage."""
import json

import numpy as np
import pytest
import torch
from helpers import run_cli
from if_helpers import if_pipeline

from ldm.cli.convert import main as convert
from ldm.cli.txt2img import main as txt2img
from ldm.diffusion.guidance import classifier_guidance
from ldm.diffusion.noise_augmentation import if_noise_level_from_level
from ldm.diffusion.sampler_registry import sampler_names
from ldm.models.text_encoders import T5TextEncoder
from ldm.pipeline.cascade import load_cascade, use_model_defaults
from ldm.pipeline.load import load_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """IF-I at 8 px and IF-II 8 -> 32 px (IF's factor 4), diffusers folders with the same T5."""
    root = tmp_path_factory.mktemp("if")
    return if_pipeline(root, False, sample_size=8)[1], if_pipeline(root, True, sample_size=32)[1]


def test_if_defaults_apply_unless_overridden(folders):
    base, sr = folders
    cascade = load_cascade(base, [sr])
    common = use_model_defaults(cascade, steps=None, guidance=None, sampler=None)
    assert cascade.options["stage_steps"] == [100, 50] and cascade.options["stage_guidance"] == [7.0, 4.0]
    assert cascade.options["stage_sampler"] == ["ddpm", "ddpm"] and common["steps"] == 30
    # an explicit common value wins over the stages' own
    cascade = load_cascade(base, [sr])
    assert use_model_defaults(cascade, steps=20, guidance=None, sampler="ddim")["steps"] == 20
    assert cascade.options["stage_steps"] is None and cascade.options["stage_sampler"] is None
    assert cascade.options["stage_guidance"] == [7.0, 4.0]
    alone = load_pipeline(base)
    assert use_model_defaults(alone, steps=None, guidance=None, sampler=None) == \
        {"steps": 100, "guidance": 7.0, "sampler": "ddpm"}
    low, high = cascade.stages
    assert (low.threshold_percentile(), high.threshold_percentile()) == (0.95, 0.95)
    assert (low.stage_config.dynamic_threshold_max, high.stage_config.dynamic_threshold_max) == (1.5, 1.0)


@pytest.mark.slow
def test_cascade_from_the_cli_encodes_t5_once(folders, tmp_path, capsys, monkeypatch):
    base, sr = folders
    calls = []
    encode = T5TextEncoder._encode
    monkeypatch.setattr(T5TextEncoder, "_encode", lambda self, prompts: calls.append(list(prompts)) or
                        encode(self, prompts))
    out = tmp_path / "out"
    code, err = run_cli(txt2img, ["A photo of a cat", "--model", base, "--upscaler", sr, "--out", out,
                                  "--stage-steps", "3,2", "--seed", 5], capsys)
    assert code == 0, err
    assert calls == [["A photo of a cat"], [""]]  # the prompt and "" once, for both stages
    record = json.loads((out / "metadata.jsonl").read_text())
    assert (record["width"], record["height"]) == (32, 32)
    first, second = record["stages"]
    assert (first["steps"], first["guidance"], first["sampler"], first["size"]) == (3, 7.0, "ddpm", 8)
    assert (second["steps"], second["guidance"], second["sampler"], second["size"]) == (2, 4.0, "ddpm", 32)
    assert second["aug_level"] == pytest.approx(0.25683, abs=1e-5)  # IF's noise_level 250


@pytest.mark.slow
def test_every_sampler_and_guidance_wrapper_runs_on_an_if_stage(folders):
    pipe = load_pipeline(folders[0])
    grad = lambda x, sigma, cond: -0.1 * x  # a classifier pulling towards 0  # noqa: E731
    for name in sampler_names():
        # dpm_adaptive sizes its own steps: this classifier adds sigma^2 * 0.1 x (4e7 x at IF's sigma_max 20291), so
        # stiff an ODE that it rightly takes log-SNR steps of 1e-7 (its max_nfe refusal: test_samplers_dpm_singlestep)
        wrappers = () if name == "dpm_adaptive" else (lambda d: classifier_guidance(d, grad),)
        images = pipe("a cat", seed=0, steps=3, guidance=5.0, guidance_rescale=0.5, sampler=name, wrappers=wrappers)
        pixels = torch.from_numpy(np.asarray(images[0], dtype=np.float32))
        assert images[0].size == (8, 8) and pixels.std() > 1, name  # an image, not a constant


def test_noise_level_on_an_if_cascade_points_to_aug_level(folders, tmp_path, capsys):
    """A DeepFloyd user passes IF-II's noise_level (IFSuperResolutionPipeline's argument); ldm's IF-II takes the level
    of the same (alpha, sigma) as --aug-level. The refusal said only that --noise-level is the x4 upscaler's."""
    base, sr = folders
    out = tmp_path / "out"
    code, err = run_cli(txt2img, ["a cat", "--model", base, "--upscaler", sr, "--out", out, "--noise-level", 250],
                        capsys)
    assert code == 2 and not out.exists()
    assert "--aug-level" in err and "noise_level 250 is --aug-level 0.25682854" in err, err
    # the level as printed reaches IF-II's noise-level embedding as 250 exactly (a float32, as sampling passes it)
    assert float(if_noise_level_from_level(torch.tensor(0.25682854, dtype=torch.float32))) == 250.0


def test_a_stage_two_alone_names_the_command_that_upscales_an_image(folders, tmp_path, capsys):
    """IF-II given as --model: the refusal's way out is a command that works. It used to suggest `--init-image IMG
    --start-stage 2` on the same command line, which is refused in turn (--start-stage needs --upscaler)."""
    from PIL import Image

    base, sr = folders
    low = tmp_path / "low.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)).save(low)
    code, err = run_cli(txt2img, ["a cat", "--model", sr, "--init-image", low, "--out", tmp_path / "no"], capsys)
    assert code == 2 and not (tmp_path / "no").exists()
    assert f"--model BASE --upscaler {sr}" in err and "add --init-image IMG --start-stage 2" in err, err
    out = tmp_path / "out"  # the advice, followed
    code, err = run_cli(txt2img, ["a cat", "--model", base, "--upscaler", sr, "--init-image", low, "--start-stage", 2,
                                  "--stage-steps", "1,2", "--out", out], capsys)
    assert code == 0, err
    record = json.loads((out / "metadata.jsonl").read_text())
    assert (record["width"], record["height"]) == (32, 32) and [s["ran"] for s in record["stages"]] == [False, True]


def test_a_folder_with_thresholding_off_keeps_its_cap_for_dynamic_threshold(tmp_path, capsys):
    """IF-I whose scheduler says `thresholding: false, sample_max_value: 1.5`: `--dynamic-threshold 0.95` (and
    `pipe(..., dynamic_threshold=0.95)`) caps s at 1.5 as diffusers does, and the images' metadata says so; the cap
    survives a conversion to native and back. It was lost: s ran uncapped (tests/test_if_ddpm_thresholding.py)."""
    _, folder = if_pipeline(tmp_path, False, sample_size=8)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "thresholding": False}))
    pipe = load_pipeline(folder)
    assert pipe.stage.thresholding(0.95)[0].keywords == {"percentile": 0.95, "max_value": 1.5}
    out = tmp_path / "out"
    common = ["a cat", "--model", folder, "--steps", 2, "--guidance", 2]
    assert run_cli(txt2img, [*common, "--dynamic-threshold", 0.95, "--out", out / "on"], capsys)[0] == 0
    assert run_cli(txt2img, [*common, "--out", out / "off"], capsys)[0] == 0
    on = json.loads((out / "on" / "metadata.jsonl").read_text())
    off = json.loads((out / "off" / "metadata.jsonl").read_text())
    assert (on["dynamic_threshold"], on["dynamic_threshold_max"], "clip_sample" in on) == (0.95, 1.5, False)
    assert (off["dynamic_threshold"], "dynamic_threshold_max" in off, off["clip_sample"]) == (None, False, 1.0)
    native, back = tmp_path / "native", tmp_path / "back"
    assert run_cli(convert, [folder, native, "--to", "native"], capsys)[0] == 0
    assert run_cli(convert, [native, back, "--to", "diffusers"], capsys)[0] == 0
    written = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    assert (written["thresholding"], written["sample_max_value"]) == (False, 1.5)
    assert load_pipeline(back).stage.threshold_cap(0.95) == 1.5

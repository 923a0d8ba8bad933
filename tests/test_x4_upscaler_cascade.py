"""The x4 upscaler as a cascade stage: a tiny pixel base -> x4 from `ldm-txt2img`, one PNG per prompt recording every
stage; the x4 stage upscales the previous stage's pixels with its own text encoder; alone on an existing image."""
import json

import numpy as np
import pytest
import torch
from helpers import noisy_image
from PIL import Image
from helpers import stage_parts
from upscaler_helpers import tiny_diffusers_upscale_pipeline

from ldm import load_cascade
from ldm.cli.txt2img import main
from ldm.io.native_format import save_native
from ldm.models.unet import UNetModel
from ldm.pipeline.images import from_pil, read_png_parameters
from ldm.pipeline.settings import GenerationSettings

pytest.importorskip("diffusers")
FAST = ["--sampler", "ddim", "--stage-steps", "2,2", "--stage-guidance", "3,4"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 16 px pixel base (imagen-tiny-base) and the tiny x4 upscaler as a diffusers folder."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("x4-cascade")
    save_native(stage_parts("base"), root / "base")
    tiny_diffusers_upscale_pipeline().save_pretrained(root / "x4")
    return {"base": root / "base", "x4": root / "x4"}


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_base_then_x4_from_the_cli_records_every_stage(models, tmp_path, monkeypatch):
    labels = []
    forward = UNetModel.forward

    def spy(self, x, timesteps, context=None, y=None, context_mask=None):
        labels.append(y.clone())
        return forward(self, x, timesteps, context=context, y=y, context_mask=context_mask)

    monkeypatch.setattr(UNetModel, "forward", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    assert run("--prompts", prompts, "--model", models["base"], "--upscaler", models["x4"], "--out", out,
               "--noise-level", 30, "--seed", 5, *FAST) == 0
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 2 and len(list(out.glob("*.png"))) == 2
    for record in records:
        assert read_png_parameters(out / record["file_name"]) == record
        assert Image.open(out / record["file_name"]).size == (64, 64)  # 16 px base, x4
        base, x4 = record["stages"]
        assert (base["size"], base["steps"], base["guidance"], base["dynamic_threshold"]) == (16, 2, 3.0, 0.995)
        assert (x4["size"], x4["steps"], x4["guidance"], x4["noise_level"]) == (64, 2, 4.0, 30)
        assert x4["dynamic_threshold"] is None and x4["text_encoder"] == "own" and "aug_level" not in x4
    assert len(labels) == 4 and all(torch.equal(y, torch.full((2,), 30)) for y in labels)  # 2 prompts x 2 steps
    a, b = (np.asarray(Image.open(out / r["file_name"]), dtype=float) for r in records)
    assert np.abs(a - b).mean() > 1  # each prompt its own image


def test_the_x4_stage_encodes_its_prompt_with_its_own_text_encoder(models):
    cascade = load_cascade(models["base"], [models["x4"]], device="cpu", dtype="fp32")
    assert cascade.text_groups == [0, 1] and cascade.output_sizes() == [16, 64]
    calls = []
    for name, stage in zip(("base", "x4"), cascade.stages):
        encode = stage.text_encoder.encode
        stage.text_encoder.encode = (lambda p, clip_skip=None, encode=encode, name=name:
                                     calls.append((name, list(p))) or encode(p, clip_skip))
    low, high = cascade("a red circle", "blurry", seed=1, steps=2, sampler="ddim", guidance=3.0,
                        return_all_stages=True)
    assert calls == [("base", ["a red circle"]), ("base", ["blurry"]), ("x4", ["a red circle"]), ("x4", ["blurry"])]
    assert low[0].size == (16, 16) and high[0].size == (64, 64)
    # the x4 upscaler's own defaults apply where the call leaves steps and guidance to the model
    base, x4 = cascade.records(GenerationSettings(steps=None, guidance=None))
    assert (base["steps"], base["guidance"]) == (30, 7.5) and (x4["steps"], x4["guidance"], x4["noise_level"]) == (
        75, 9.0, 20)


def test_starting_at_the_x4_stage_from_the_base_png_reproduces_the_cascade(models, tmp_path):
    full, stage1, upscaled = tmp_path / "full", tmp_path / "stage1", tmp_path / "upscaled"
    assert run("a green ring", "--model", models["base"], "--upscaler", models["x4"], "--out", full, "--seed", 3,
               *FAST) == 0
    assert run("a green ring", "--model", models["base"], "--out", stage1, "--seed", 3, "--sampler", "ddim",
               "--steps", 2, "--guidance", 3) == 0
    assert run("a green ring", "--model", models["base"], "--upscaler", models["x4"], "--out", upscaled, "--seed", 3,
               "--init-image", next(stage1.glob("*.png")), "--start-stage", 2, *FAST) == 0
    a = from_pil(Image.open(next(full.glob("*.png"))))
    b = from_pil(Image.open(next(upscaled.glob("*.png"))))
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, b)


def test_the_x4_upscaler_alone_upscales_an_image(models, tmp_path):
    image = tmp_path / "low.png"
    noisy_image(2, 24).save(image)
    out = tmp_path / "out"
    assert run("a photo", "--model", models["x4"], "--init-image", image, "--out", out, "--steps", 2,
               "--sampler", "ddim", "--noise-level", 40) == 0
    record = json.loads((out / "metadata.jsonl").read_text())
    assert (record["width"], record["height"], record["noise_level"]) == (96, 96, 40)
    assert (record["steps"], record["guidance"]) == (2, 9.0)  # guidance: the x4 upscaler's default


@pytest.mark.parametrize("case, message", [
    ("no_image", "give the image to upscale with --init-image"),
    ("as_base", "a super-resolution stage cannot be the base"),
    ("level", "0..350"),
    ("level_without_upscaler", "--noise-level is the x4 upscaler's"),
    ("odd_size", "multiples of 4"),
])
def test_bad_x4_requests_exit_2_before_writing(models, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    image = tmp_path / "low.png"
    noisy_image(2, 18 if case == "odd_size" else 16).save(image)
    args = {
        "no_image": ["a cat", "--model", models["x4"]],
        "as_base": ["a cat", "--model", models["x4"], "--upscaler", models["base"]],
        "level": ["a cat", "--model", models["base"], "--upscaler", models["x4"], "--noise-level", 351],
        "level_without_upscaler": ["a cat", "--model", models["base"], "--noise-level", 20],
        "odd_size": ["a cat", "--model", models["x4"], "--init-image", image],
    }[case]
    assert run(*args, "--out", out, "--steps", 2) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_memory_check_sizes_the_x4_output_from_its_input_image(models, tmp_path, capsys, monkeypatch):
    import ldm.pipeline.generate as generate

    monkeypatch.setattr(generate, "available_bytes", lambda device: 200 * 2**20)
    image = tmp_path / "big.png"
    noisy_image(2, 512).save(image)
    out = tmp_path / "out"
    assert run("a cat", "--model", models["x4"], "--init-image", image, "--out", out, "--steps", 2) == 2
    assert "2048x2048" in capsys.readouterr().err and not out.exists()

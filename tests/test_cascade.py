"""The Imagen cascade: pixel stages load and sample, `load_cascade` and `ldm-txt2img --upscaler`, composability, an
oracle cascade that reproduces its one training image, the augmentation level reaching the network, and bad input."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ldm import load_cascade
from ldm.cli.txt2img import main
from ldm.config import from_dict, load_yaml, save_yaml
from ldm.diffusion.noise_augmentation import downsample, upsample
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import LdmError
from ldm.io.components import ModelParts, config_sections
from ldm.io.native_format import save_native
from ldm.io.part_types import read_section
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.efficient_unet import EfficientUNet
from ldm.models.unet import UNetConfig, UNetModel
from ldm.pipeline.cascade import Cascade
from ldm.pipeline.images import from_pil, read_png_parameters, to_pil
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.pipeline import Pipeline

from helpers import stage_parts, visible_weights

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--steps", "2", "--sampler", "ddim", "--guidance", "3"]


def latent_base_parts(text_encoder: nn.Module) -> ModelParts:
    """A tiny latent model making 16 px images (8 px latents), with the given text encoder."""
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
                      channel_mult=[1, 2], num_heads=2, context_dim=32, sample_size=8)
    autoencoder = from_dict(AutoencoderConfig, dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16))
    text_config = read_section("text_encoder", load_yaml(CONFIGS / "imagen-tiny-base.yaml")["model"]["text_encoder"])
    schedule = ScheduleConfig(beta_schedule="scaled_linear")
    return ModelParts(unet=visible_weights(UNetModel(unet)), autoencoder=AutoencoderKL(autoencoder),
                      text_encoder=text_encoder, schedule=schedule,
                      config=config_sections({"unet": unet, "autoencoder": autoencoder, "text_encoder": text_config},
                                             schedule))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base (16 px), sr (16 -> 32 px) sharing its text encoder, sr_other_text, and a latent base with the same text."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("cascade")
    base = stage_parts("base")
    folders = {"base": base, "sr": stage_parts("sr", base.text_encoder), "sr_other_text": stage_parts("sr"),
               "latent": latent_base_parts(base.text_encoder)}
    for name, parts in folders.items():
        save_native(parts, root / name)
    return {name: root / name for name in folders}


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_a_pixel_model_loads_with_its_stage_and_thresholds_by_default(models):
    pipe = load_pipeline(models["base"], device="cpu", dtype="fp32")
    assert pipe.autoencoder is None and pipe.stage.stage_config.resolution == 16 and pipe.default_size == 16
    assert pipe.stage.threshold_percentile() == 0.995  # the config's percentile
    assert pipe.stage.threshold_percentile(0.0) is None  # --dynamic-threshold 0: off
    latent = load_pipeline(models["latent"], device="cpu", dtype="fp32")
    assert latent.stage.threshold_percentile() is None  # latent models: off
    on = np.asarray(pipe("a red circle", steps=2, seed=1, guidance=8.0)[0], dtype=float)
    off = np.asarray(pipe("a red circle", steps=2, seed=1, guidance=8.0, dynamic_threshold=0.0)[0], dtype=float)
    assert np.abs(on - off).max() > 0  # thresholding changed the high-guidance image


@pytest.mark.slow
def test_cascade_shares_one_text_embedding_and_its_first_stage_is_the_base_alone(models):
    base = load_pipeline(models["base"], device="cpu", dtype="fp32")
    cascade = load_cascade(base, [models["sr"]], device="cpu", dtype="fp32")
    calls = []
    for stage in cascade.stages:
        encode = stage.text_encoder.encode
        stage.text_encoder.encode = (lambda prompts, clip_skip=None, encode=encode:
                                     calls.append(list(prompts)) or encode(prompts, clip_skip))
    low, high = cascade("a red circle", seed=3, steps=2, guidance=3.0, return_all_stages=True)
    assert low[0].size == (16, 16) and high[0].size == (32, 32)
    assert calls == [["a red circle"], [""]]  # the prompt and "" (CFG) encoded once, shared by both stages
    alone = base("a red circle", seed=3, steps=2, guidance=3.0)
    assert np.array_equal(np.asarray(low[0]), np.asarray(alone[0]))


def test_starting_at_stage_2_from_stage_1s_png_reproduces_the_cascade(models, tmp_path):
    out = tmp_path / "full"
    assert run("a blue square", "--model", models["base"], "--upscaler", models["sr"], "--out", out,
               "--stage-steps", "3,2", "--stage-sampler", "ddim,euler", "--stage-guidance", "4,2",
               "--aug-level", "0.3", "--seed", 7) == 0
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert read_png_parameters(out / record["file_name"]) == record
    first, second = record["stages"]
    assert (first["steps"], first["sampler"], first["guidance"], first["size"]) == (3, "ddim", 4.0, 16)
    assert (second["steps"], second["sampler"], second["guidance"], second["size"]) == (2, "euler", 2.0, 32)
    assert second["aug_level"] == 0.3 and first["dynamic_threshold"] == second["dynamic_threshold"] == 0.995

    stage1 = tmp_path / "stage1"
    assert run("a blue square", "--model", models["base"], "--out", stage1, "--steps", 3, "--sampler", "ddim",
               "--guidance", 4, "--seed", 7) == 0
    low = next(stage1.glob("*.png"))
    upscaled = tmp_path / "upscaled"
    assert run("a blue square", "--model", models["base"], "--upscaler", models["sr"], "--out", upscaled,
               "--stage-steps", "3,2", "--stage-sampler", "ddim,euler", "--stage-guidance", "4,2",
               "--aug-level", "0.3", "--seed", 7, "--init-image", low, "--start-stage", 2) == 0
    a = np.asarray(from_pil(Image.open(out / record["file_name"])))
    b = np.asarray(from_pil(Image.open(next(upscaled.glob("*.png")))))
    assert a.shape == (1, 3, 32, 32) and np.array_equal(a, b)


def test_a_latent_base_then_a_pixel_sr_stage(models, tmp_path):
    out = tmp_path / "out"
    assert run("a red circle", "--model", models["latent"], "--upscaler", models["sr"], "--out", out, *FAST) == 0
    record = json.loads((out / "metadata.jsonl").read_text())
    assert (record["width"], record["height"]) == (32, 32)
    assert [s["dynamic_threshold"] for s in record["stages"]] == [None, 0.995]  # off for the latent base


def test_the_aug_level_reaches_the_network_unrounded(models, tmp_path, monkeypatch):
    seen = []
    forward = EfficientUNet.forward

    def spy(self, x, timesteps, *args, **kwargs):
        if kwargs.get("aug_level") is not None:
            seen.append(kwargs["aug_level"].clone())
        return forward(self, x, timesteps, *args, **kwargs)

    monkeypatch.setattr(EfficientUNet, "forward", spy)
    assert run("a red circle", "--model", models["base"], "--upscaler", models["sr"], "--out", tmp_path / "out",
               "--aug-level", "0.26", *FAST) == 0  # the whole path: CLI, cascade, strategy, CFG, denoiser, network
    cascade = load_cascade(models["base"], [models["sr"]], device="cpu", dtype="fp32")
    cascade("a red circle", seed=0, steps=2, guidance=3.0, aug_level=0.26)
    assert len(seen) == 4  # two steps (CFG batched) from the CLI, two from Python
    for level in seen:
        assert level.dtype == torch.float32 and level.shape == (2,)
        assert torch.equal(level, torch.full((2,), 0.26))  # not rounded to 0 (imagen-pytorch's cast to long)


class OracleNetwork(nn.Module):
    """An x0-predicting network that knows the one training image: the base returns it at its size; the SR stage
    returns the image's high frequencies on top of the low-res image it is given (so it depends on `concat`)."""

    def __init__(self, image: torch.Tensor, size: int, low_res_size: int | None):
        super().__init__()
        self.config = SimpleNamespace(sample_size=size, downsample_factor=1, in_channels=3 if low_res_size is None
                                      else 6, context_dim=32)
        self.low_res_size = low_res_size
        target = downsample(image, size) if size != image.shape[-1] else image
        if low_res_size is not None:  # the detail the low-res image lacks
            target = target - upsample(downsample(target, low_res_size), size)
        self.register_buffer("target", target)
        self.levels = []

    def forward(self, x, timesteps, context=None, context_mask=None, aug_level=None):
        x0 = self.target.expand(x.shape[0], -1, -1, -1)
        if self.low_res_size is not None:
            self.levels.append(aug_level)
            x0 = x0 + x[:, 3:]  # the conditioning image (upsampled low-res, augmented at aug_level)
        return x0


def _oracle_pipeline(image, text_encoder, size, low_res_size=None) -> Pipeline:
    schedule = ScheduleConfig(beta_schedule="cosine", prediction_type="sample")
    stage = {"resolution": size, "low_res_size": low_res_size, "aug_level": 0.0}
    text_section = {"type": "small", "freeze": True, "small": {"width": 32, "layers": 1, "heads": 2}}
    parts = ModelParts(unet=OracleNetwork(image, size, low_res_size), text_encoder=text_encoder, schedule=schedule,
                       config={"stage": stage, "text_encoder": text_section, "scheduler": {}})
    return Pipeline(parts)


def test_an_oracle_cascade_reproduces_its_one_image_at_full_resolution():
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 4, 4, generator=g) * 1.6 - 0.8
    detail = torch.rand(1, 3, 32, 32, generator=g) * 0.3 - 0.15
    image = from_pil(to_pil(torch.nn.functional.interpolate(coarse, size=32, mode="bilinear") + detail))  # 8-bit
    text = stage_parts("base").text_encoder
    cascade = Cascade([_oracle_pipeline(image, text, 16), _oracle_pipeline(image, text, 32, low_res_size=16)])
    low, final = cascade("a picture", seed=0, steps=4, sampler="ddim", guidance=2.0, return_all_stages=True)
    final = from_pil(final)
    # Exact up to the 8-bit rounding of the 16 px image between stages (what a saved PNG holds).
    assert (final - image).abs().max() <= 3 / 127.5
    assert from_pil(low).shape[-1] == 16
    noisy = from_pil(cascade("a picture", seed=0, steps=4, sampler="ddim", guidance=2.0, aug_level=0.8))
    assert (noisy - image).abs().max() > 0.2  # the SR oracle does use its conditioning image


@pytest.mark.parametrize("case, message", [
    ("size", "upscales 8 px images, but stage 1 makes 16 px images"),
    ("latent", "a latent model cannot be an upscaler"),
    ("aug", "--aug-level must lie in [0, 1]"),
    ("text", "has a different text encoder"),
    ("base_sr", "a super-resolution stage cannot be the base"),
    ("sr_alone", "is a super-resolution stage"),
    ("no_image", "--start-stage 2 upscales an image: give it with --init-image"),
    ("image_size", "but stage 2 upscales 16x16 images"),
    ("height", "leave out --height and --width"),
    ("stage_list", "--stage-steps gives 3 value(s) for a cascade of 2 stages"),
    ("no_upscaler", "--aug-level: cascade options; give the super-resolution stages with --upscaler"),
])
def test_bad_cascade_input_exits_2_before_writing(models, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    base, sr = models["base"], models["sr"]
    args = ["a cat", "--model", base, "--upscaler", sr, "--out", out, *FAST]
    if case == "size":
        small = tmp_path / "sr8"
        shutil.copytree(sr, small)
        config = load_yaml(small / "config.yaml")
        config["stage"]["low_res_size"] = 8
        save_yaml(config, small / "config.yaml")
        args[4] = small
    elif case == "latent":
        args[4] = models["latent"]
    elif case == "aug":
        args += ["--aug-level", "1.5"]
    elif case == "text":
        args[4] = models["sr_other_text"]
    elif case == "base_sr":
        args[2] = sr
    elif case == "sr_alone":
        args = ["a cat", "--model", sr, "--out", out, *FAST]
    elif case == "no_image":
        args += ["--start-stage", "2"]
    elif case == "image_size":
        image = tmp_path / "big.png"
        to_pil(torch.zeros(1, 3, 20, 20))[0].save(image)
        args += ["--start-stage", "2", "--init-image", image]
    elif case == "height":
        args += ["--height", "32"]
    elif case == "stage_list":
        args += ["--stage-steps", "2,2,2"]
    elif case == "no_upscaler":
        args = ["a cat", "--model", base, "--out", out, "--aug-level", "1", *FAST]
    assert run(*args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cascade_options_are_checked_in_python_too(models):
    with pytest.raises(LdmError, match="--aug-level must lie in"):
        load_cascade(models["base"], [models["sr"]], aug_level=-0.1)
    with pytest.raises(LdmError, match="--start-stage 3"):
        load_cascade(models["base"], [models["sr"]], start_stage=3)

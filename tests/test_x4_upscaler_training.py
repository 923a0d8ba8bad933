"""Training the x4 stage with tools/train.py: low-res inputs and noise levels made from each sample, v-prediction,
a few CPU steps from scratch and as a fine-tune of a diffusers x4 folder, and an export that upscales."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from upscaler_helpers import tiny_diffusers_upscale_pipeline

from ldm.cli.txt2img import main as txt2img
from ldm.config import load_yaml
from ldm.diffusion.latent_upscale import LatentUpscaleConfig, noise_low_res
from ldm.errors import ConfigError
from ldm.io.formats import load_model
from ldm.models.unet import UNetModel
from ldm.train.latent_upscale import latent_upscale_inputs, low_res_of
from tools.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["progress=false", "log_with=none", "data.batches_per_epoch=2", "checkpoint_every=100",
        "checkpoints_total_limit=null", "sampling.steps=2", "sampling.n_per_prompt=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from ldm.data.synthetic import write_shape_shards

    out = tmp_path_factory.mktemp("x4-shapes")
    write_shape_shards(out, 8, seed=0, image_size=32, samples_per_shard=4, image_format="png")
    return str(out)


def test_the_inputs_are_the_noised_low_res_image_and_its_level_drawn_per_sample():
    config = LatentUpscaleConfig(max_noise_level=350)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    extra = latent_upscale_inputs(images, config, 4, [1, 2, 3], torch.device("cpu"))
    again = latent_upscale_inputs(images[1:2], config, 4, [2], torch.device("cpu"))
    levels = extra["y"]
    assert levels.dtype == torch.long and len(set(levels.tolist())) == 3 and ((0 <= levels) & (levels < 350)).all()
    assert extra["concat"].shape == (3, 3, 8, 8)  # the latent's size: the autoencoder's factor is the upscale factor
    assert torch.equal(again["concat"][0], extra["concat"][1]) and again["y"][0] == levels[1]  # per sample, seeded
    # level by level, the noised image is the sampling-time path on the same low-res image
    noise = extra["concat"] - noise_low_res(low_res_of(images, 4), torch.zeros(3, 3, 8, 8), levels, config)
    alpha_bar = config.alphas_cumprod()[levels]
    assert torch.allclose(noise.flatten(1).std(1) ** 2, 1 - alpha_bar, rtol=0.5)


def test_a_latent_upscaler_config_is_checked():
    from ldm.train.model import build_parts
    from ldm.train.config import ModelConfig

    model = load_yaml(ROOT / "configs" / "x4-tiny.yaml")["model"]
    with pytest.raises(ConfigError, match="num_classes"):
        build_parts(ModelConfig(**{**model, "unet": {**model["unet"], "num_classes": 100}}))
    with pytest.raises(ConfigError, match="in_channels"):
        build_parts(ModelConfig(**{**model, "unet": {**model["unet"], "in_channels": 4}}))


@pytest.mark.slow
def test_the_hint_after_training_an_upscaler_is_a_command_that_runs(shards, tmp_path, capsys):
    # it printed `ldm-txt2img --model OUT "prompt"`, which refuses a latent upscaler without --init-image
    assert train_main(["--config", str(ROOT / "configs" / "x4-tiny.yaml"), "--train-data", shards, "--output-dir",
                       str(tmp_path / "run"), "--max-steps", "0", *FAST, "sampling.at_end=false"]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert "--init-image LOW_RES.png" in hint and f"--upscaler {tmp_path / 'run'}" in hint, hint


def test_the_x4_stage_trains_and_exports(shards, tmp_path, monkeypatch):
    seen = []
    forward = UNetModel.forward

    def spy(self, x, timesteps, context=None, y=None, context_mask=None):
        if self.training:
            seen.append((x.shape[1], y.clone()))
        return forward(self, x, timesteps, context=context, y=y, context_mask=context_mask)

    monkeypatch.setattr(UNetModel, "forward", spy)
    # from scratch, with the tiny config
    scratch = tmp_path / "scratch"
    assert train_main(["--config", str(ROOT / "configs" / "x4-tiny.yaml"), "--train-data", shards, "--output-dir",
                       str(scratch), "--max-steps", "2", *FAST]) == 0
    assert seen and all(channels == 7 for channels, _ in seen)
    assert len({int(v) for _, y in seen for v in y}) > 2  # a level per sample
    config = load_yaml(scratch / "config.yaml")
    assert config["latent_upscale"]["max_noise_level"] == 350 and config["scheduler"]["prediction_type"] == "v_prediction"

    # a fine-tune of an x4 upscaler folder (diffusers' tiny one: 100 class labels, so levels below 100)
    folder = tmp_path / "x4"
    tiny_diffusers_upscale_pipeline().save_pretrained(folder)
    tuned = tmp_path / "tuned"
    assert train_main(["--config", str(ROOT / "configs" / "x4-tiny.yaml"), "--train-data", shards, "--output-dir",
                       str(tuned), "--max-steps", "2", *FAST, "sampling.at_end=true", "sampling.guidance=1",
                       f"model.pretrained.unet={folder}", f"model.pretrained.autoencoder={folder}",
                       f"model.pretrained.text_encoder={folder}", "model.unet.num_classes=100",
                       "model.latent_upscale.max_noise_level=100", "model.autoencoder.scale_factor=0.08333"]) == 0
    start, end = load_model(folder), load_file(tuned / "unet.safetensors")
    changed = [k for k, v in start.unet.state_dict().items() if not torch.equal(v, end[k])]
    assert changed and end.keys() == start.unet.state_dict().keys()
    grid = Image.open(next((tuned / "samples").glob("*.png")))
    assert grid.width >= 3 * 32  # low-res | upscaled | truth
    exported = load_model(tuned)
    assert exported.config["latent_upscale"]["max_noise_level"] == 100 and exported.unet.config.num_classes == 100

    image, out = tmp_path / "low.png", tmp_path / "out"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(image)
    assert txt2img(["a red circle", "--model", str(tuned), "--init-image", str(image), "--out", str(out),
                    "--steps", "2", "--sampler", "ddim"]) == 0
    record = json.loads((out / "metadata.jsonl").read_text())
    assert (record["width"], record["noise_level"], record["guidance"]) == (32, 20, 9.0)

"""Training Imagen's stages with tools/train.py: SR inputs made from the sample (levels, crops), a base and an SR
stage trained from webdataset shards (one under `accelerate launch --cpu`) that sample as a cascade, exact resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm.cli.txt2img import main as txt2img
from ldm.config import apply_overrides, from_dict, load_yaml
from ldm.diffusion.noise_augmentation import StageConfig, downsample, upsample
from ldm.train.config import TrainConfig
from ldm.train.loop import train
from ldm.train.super_resolution import super_resolution_inputs
from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
FAST = ["progress=false", "log_with=none", "sampling.steps=2", "sampling.n_per_prompt=1", "data.batches_per_epoch=2",
        "checkpoint_every=2", "checkpoints_total_limit=null"]


def stage_config(name: str, shards: str, out: Path, *overrides: str) -> TrainConfig:
    data = apply_overrides(load_yaml(ROOT / "configs" / f"imagen-tiny-{name}.yaml"), [*FAST, *overrides])
    data["data"]["shards"], data["output_dir"] = shards, str(out)
    return from_dict(TrainConfig, data)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from ldm.data.synthetic import write_shape_shards

    out = tmp_path_factory.mktemp("shapes")
    write_shape_shards(out, 12, seed=0, image_size=32, samples_per_shard=6, image_format="png")
    return str(out)


def _images(batch=3, size=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def test_sr_inputs_draw_a_level_per_sample_from_its_seed():
    stage = StageConfig(resolution=32, low_res_size=16, train_aug_level_max=0.5)
    images = _images()
    x0, extra = super_resolution_inputs(images, stage, [1, 2, 3], torch.device("cpu"))
    again, extra_again = super_resolution_inputs(images, stage, [1, 2, 3], torch.device("cpu"))
    levels = extra["aug_level"]
    assert torch.equal(x0, images) and torch.equal(extra["concat"], extra_again["concat"])  # seeded per sample
    assert levels.dtype == torch.float32 and len(set(levels.tolist())) == 3 and (0 <= levels).all()
    assert (levels <= 0.5).all()
    _, other = super_resolution_inputs(images[:1], stage, [1], torch.device("cpu"))
    assert torch.equal(other["concat"][0], extra["concat"][0])  # a sample's inputs do not depend on its batch


def test_sr_inputs_crop_target_and_low_res_image_alike():
    stage = StageConfig(resolution=32, low_res_size=8, train_crop_size=16, train_aug_level_max=0.0)  # level 0: exact
    images = _images()
    x0, extra = super_resolution_inputs(images, stage, [4, 5, 6], torch.device("cpu"))
    assert x0.shape == (3, 3, 16, 16) and extra["concat"].shape == (3, 3, 16, 16)
    low = downsample(images, 8)
    for i in range(3):  # find each crop's offset in the target; the concat is that region of the low-res image
        matches = [(t, l) for t in range(0, 17, 4) for l in range(0, 17, 4)
                   if torch.equal(images[i, :, t:t + 16, l:l + 16], x0[i])]
        assert len(matches) == 1
        t, l = matches[0]
        expected = upsample(low[i:i + 1, :, t // 4: t // 4 + 4, l // 4: l // 4 + 4], 16)
        assert torch.equal(extra["concat"][i:i + 1], expected)


@pytest.mark.slow
def test_a_pixel_stage_trains_from_precomputed_text_embeddings(shards, tmp_path):
    import importlib.util

    from ldm.data import DataConfig, make_loader

    spec = importlib.util.spec_from_file_location("precompute_latents", ROOT / "data_scripts" / "precompute_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    precompute = module.main

    out = tmp_path / "precomputed"
    assert precompute(["--model", str(ROOT / "configs" / "imagen-tiny-sr.yaml"), "--shards", shards, "--out",
                       str(out), "--resolution", "32", "--batch-size", "4", "--num-workers", "0",
                       "--no-progress"]) == 0
    assert json.loads((out / "latents_meta.json").read_text())["encoders"]["autoencoder"]["class"] == "none"

    def by_key(**kwargs):
        config = DataConfig(resampled=False, shuffle_buffer=0, num_workers=0, resolution=32, flip_prob=0.0,
                            caption_dropout=0.0, **kwargs)
        return {k: b for batch in make_loader(config) for k, b in zip(batch["key"], zip(*[
            batch.get("image", batch.get("latent_mean")), batch.get("text_mask", [None] * len(batch["key"]))]))}

    images, stored = by_key(shards=shards), by_key(shards=str(out), sample_format="latent")
    assert stored.keys() == images.keys()
    for key, (image, mask) in images.items():  # the shards hold the image itself (8-bit values are exact in fp16)
        assert (stored[key][0].float() - image).abs().max() <= 1e-3 and stored[key][1].any()
    run = tmp_path / "run"
    train(stage_config("sr", str(out), run, "max_steps=1", "data.sample_format=latent", "loss.inputs=latents",
                       "data.flip_prob=0"))
    assert (run / "unet.safetensors").is_file()


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "unet.safetensors"))


@pytest.mark.slow
def test_a_base_and_an_sr_stage_train_from_shards_and_sample_as_a_cascade(shards, tmp_path):
    base = tmp_path / "base"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tools" / "train.py"), "--config", str(ROOT / "configs" / "imagen-tiny-base.yaml"),
           "--train-data", shards, "--output-dir", str(base), *FAST, "max_steps=2", "data.resolution=16"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert (base / "unet.safetensors").is_file() and "autoencoder" not in load_yaml(base / "config.yaml")
    assert load_yaml(base / "config.yaml")["stage"]["resolution"] == 16

    # The SR stage: no base model, only the base's frozen text encoder (a cascade shares one text embedding).
    sr = tmp_path / "sr"
    train(stage_config("sr", shards, sr, "max_steps=3", f"model.pretrained.text_encoder={base}"))
    grid = Image.open(sr / "samples" / "samples-000003.png")
    assert grid.width >= 3 * 32  # low-res | SR | ground truth
    # Exact resume: 2 steps, then resumed to 3, ends with the uninterrupted run's weights.
    resumed = tmp_path / "resumed"
    train(stage_config("sr", shards, resumed, "max_steps=2", f"model.pretrained.text_encoder={base}"))
    train(stage_config("sr", shards, resumed, "max_steps=3", f"model.pretrained.text_encoder={base}"),
          resume="latest")
    a, b = _weights(sr), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "out"
    assert txt2img([str(a) for a in ("a red circle", "--model", base, "--upscaler", sr, "--out", out,
                                      "--stage-steps", "2,2", "--guidance", "2")]) == 0
    record = json.loads((out / "metadata.jsonl").read_text())
    image = np.asarray(Image.open(out / record["file_name"]))
    assert image.shape == (32, 32, 3) and image.std() > 0
    assert [s["size"] for s in record["stages"]] == [16, 32]


@pytest.mark.slow
def test_the_1024_style_stage_trains_on_crops(shards, tmp_path):
    run = tmp_path / "crops"
    train(stage_config("sr", shards, run, "max_steps=1", "model.stage.train_crop_size=16", "sampling.at_end=true"))
    grid = Image.open(run / "samples" / "samples-000001.png")
    assert grid.width >= 3 * 16
    assert load_yaml(run / "config.yaml")["stage"]["train_crop_size"] == 16

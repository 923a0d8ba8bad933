"""Training an SDXL-layout model (issue 14, sec. 4): the tiny config trains on the CPU, exports and samples; the
micro-conditioning comes from the data (img2dataset's original size, the crop actually taken, the bucket)."""
import io
import json
import random

import pytest
import torch
from helpers import FAST_TRAINING, ROOT
from PIL import Image

from ldm.config import apply_overrides, from_dict, load_yaml
from ldm.data.samples import image_sample
from ldm.data.config import DataConfig
from ldm.data.transforms import resize_to_cover, to_tensor
from ldm.errors import LdmError
from ldm.io.formats import load_model
from ldm.models.micro_conditioning import SDXL_BASE
from ldm.models.unet import UNetConfig, UNetModel
from ldm.pipeline.load import load_pipeline
from ldm.train.config import TrainConfig
from ldm.train.loop import micro_from_batch, train


def sdxl_config(shards, out, *overrides) -> TrainConfig:
    data = apply_overrides(load_yaml(ROOT / "configs" / "sdxl-tiny.yaml"), [*FAST_TRAINING, *overrides])
    data["data"]["shards"], data["output_dir"] = shards, str(out)
    return from_dict(TrainConfig, data)


@pytest.mark.slow
def test_tiny_sdxl_trains_exports_and_samples(shape_shards, tmp_path):
    config = sdxl_config(shape_shards, tmp_path / "run", "max_steps=2", "sampling.at_end=true", "sampling.steps=2")
    out = train(config)
    parts = load_model(out)
    assert parts.unet.config.micro_conditioning == SDXL_BASE
    assert parts.config["text_encoder"]["type"] == "sdxl"
    assert (out / "samples").exists() or any(out.rglob("*.png"))
    image = load_pipeline(out)("a red circle", steps=2, seed=0, micro_conditioning={"original_size": (64, 64)})[0]
    assert image.size == (32, 32)


def raw_sample(image: Image.Image, meta: dict) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"__key__": "k", "png": buffer.getvalue(), "txt": b"a cat", "json": json.dumps(meta).encode()}


def test_micro_conditioning_comes_from_the_data():
    rng = random.Random(3)
    image = Image.fromarray(torch.randint(0, 256, (40, 64, 3), dtype=torch.uint8).numpy())  # h 40, w 64
    config = DataConfig(shards="unused", resolution=32, crop="random", image_keys=["png"])
    _, fields = image_sample(raw_sample(image, {"original_height": 800, "original_width": 1280}), config, rng)
    orig_h, orig_w, top, left, target_h, target_w = fields["micro"].tolist()
    assert (orig_h, orig_w, target_h, target_w) == (800, 1280, 32, 32)
    resized = resize_to_cover(image, 32, 32)  # 32 x 51: the crop moves along the width
    assert top == 0 and 0 <= left <= resized.width - 32
    expected = to_tensor(resized.crop((int(left), int(top), int(left) + 32, int(top) + 32)))
    assert torch.equal(fields["image"], expected)  # the corner is the crop actually taken
    _, plain = image_sample(raw_sample(image, {}), config, random.Random(3))
    assert plain["micro"].tolist()[:2] == [40, 64]  # no img2dataset metadata: the stored image's size


def test_micro_columns_follow_the_unet():
    batch = {"micro": torch.tensor([[800.0, 1280, 0, 16, 32, 32]])}
    assert micro_from_batch(batch, SDXL_BASE).tolist() == [[800, 1280, 0, 16, 32, 32]]
    assert micro_from_batch(batch, ("target_size",)).tolist() == [[32, 32]]
    with pytest.raises(LdmError, match="no `micro`"):
        micro_from_batch({}, SDXL_BASE)
    with pytest.raises(LdmError, match="aesthetic"):
        micro_from_batch(batch, ("original_size", "crops_coords_top_left", "aesthetic_score"))


def test_paper_sized_config_is_sdxl_base():
    data = load_yaml(ROOT / "configs" / "sdxl-base.yaml")
    config = from_dict(TrainConfig, data)
    unet = from_dict(UNetConfig, config.model.unet)
    with torch.device("meta"):
        count = sum(p.numel() for p in UNetModel(unet).parameters())
    assert 2.5e9 < count < 2.7e9  # SDXL's 2.6B-parameter U-Net
    assert unet.depth_per_level == (1, 2, 10) and unet.adm_in_channels == 2816

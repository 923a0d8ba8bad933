"""configs/imagen-sr-emoji.yaml: the bundled-size 64 -> 256 stage on the default model's text encoder."""
import dataclasses
from pathlib import Path

from ldm.config import from_dict, load_yaml
from ldm.diffusion.noise_augmentation import StageConfig
from ldm.models.efficient_unet import EfficientUNetConfig, count_parameters
from ldm.models.text_encoders import TextEncoderConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = load_yaml(ROOT / "configs" / "imagen-sr-emoji.yaml")


def test_sr_emoji_stage_fits_the_package_budget():
    unet = from_dict(EfficientUNetConfig, {k: v for k, v in CONFIG["model"]["unet"].items() if k != "type"})
    n = count_parameters(unet)
    assert 2.9e6 < n < 3.05e6  # 2.97 M: 5.96 MB in fp16, with the 52.7 MB of default model and CLIP under 60 MB
    assert unet.in_channels == 6 and unet.downsample_first_level and unet.context_dim == 128
    stage = from_dict(StageConfig, CONFIG["model"]["stage"])
    assert (stage.low_res_size, stage.resolution, stage.dynamic_threshold) == (64, 256, None)


def test_sr_emoji_text_encoder_is_the_default_models():
    # A cascade shares one text embedding: every stage's text encoder config must match (weights: the same CLIP).
    mine = from_dict(TextEncoderConfig, CONFIG["model"]["text_encoder"])
    theirs = from_dict(TextEncoderConfig, load_yaml(ROOT / "ldm" / "assets" / "default-model" / "config.yaml")["text_encoder"])
    assert dataclasses.replace(mine, pretrained=None) == dataclasses.replace(theirs, pretrained=None)
    assert Path(mine.pretrained).name == "clip-emoji.safetensors"

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from ldm.errors import CheckpointError, ConfigError
from ldm.io.keys_unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_diffusers_to_original,
    unet_original_to_diffusers,
)
from ldm.models.unet import UNetConfig, UNetModel

TINY = {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "context_dim": 32}
CONFIGS = {
    "sd1": UNetConfig(**TINY, attention_resolutions=(2, 1), num_heads=2),
    "sd2": UNetConfig(**{**TINY, "channel_mult": (1, 2, 2), "num_res_blocks": 2}, attention_resolutions=(4, 2),
                      num_heads=-1, num_head_channels=8, use_linear_in_transformer=True),
    "depth_per_level": UNetConfig(**TINY, attention_resolutions=(2, 1), num_heads=2, transformer_depth=(1, 3)),
    "pooled": UNetConfig(**TINY, attention_resolutions=(2,), num_heads=2, adm_in_channels=12),
    "classes": UNetConfig(**TINY, attention_resolutions=(2,), num_heads=2, num_classes=10),
    "learn_sigma": UNetConfig(**TINY, attention_resolutions=(1,), num_heads=4, learn_sigma=True, in_channels=3,
                              out_channels=3),
}
SD1 = UNetConfig()
SD2 = UNetConfig(use_linear_in_transformer=True, num_head_channels=64, num_heads=-1, context_dim=1024)


def _random_native(config):
    """A native state dict with distinct random values (so a swapped key cannot go unnoticed)."""
    return {k: torch.randn(v.shape) for k, v in UNetModel(config).state_dict().items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_to_diffusers_matches_diffusers_converter(name):
    config = CONFIGS[name]
    sd = _random_native(config)
    ours = unet_original_to_diffusers(sd, config)
    theirs = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()},
                                         unet_config_to_diffusers(config))
    assert set(ours) == set(theirs)
    assert all(ours[k] is theirs[k] for k in ours)
    # and the result is exactly the key set of diffusers' own model
    assert set(ours) == set(UNet2DConditionModel.from_config(unet_config_to_diffusers(config)).state_dict())


@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1", "sd2"])
def test_full_size_keys_match_diffusers(config):
    with torch.device("meta"):  # shapes only: no memory, no time
        native = UNetModel(config).state_dict()
        reference = UNet2DConditionModel.from_config(unet_config_to_diffusers(config)).state_dict()
    n_params = sum(v.numel() for v in native.values())
    assert n_params == {768: 859_520_964, 1024: 865_910_724}[config.context_dim]  # SD-1.x / SD-2.x U-Nets
    assert len(native) == 686
    ours = unet_original_to_diffusers(native, config)
    theirs = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in native.items()},
                                         unet_config_to_diffusers(config))
    assert set(ours) == set(theirs) == set(reference)
    assert all(ours[k] is theirs[k] and ours[k].shape == reference[k].shape for k in ours)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_round_trip_is_exact(name):
    config = CONFIGS[name]
    sd = {k: torch.randn(v.shape) for k, v in
          UNet2DConditionModel.from_config(unet_config_to_diffusers(config)).state_dict().items()}
    native = unet_diffusers_to_original(sd, config)
    assert set(native) == set(UNetModel(config).state_dict())
    back = unet_original_to_diffusers(native, config)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name):
    config = CONFIGS[name]
    assert unet_config_from_diffusers(unet_config_to_diffusers(config), learn_sigma=config.learn_sigma) == config


def test_config_translation_of_sd_presets():
    d1 = unet_config_to_diffusers(SD1)
    assert d1["attention_head_dim"] == 8 and d1["use_linear_projection"] is False
    assert d1["block_out_channels"] == [320, 640, 1280, 1280] and d1["cross_attention_dim"] == 768
    assert d1["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert d1["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    d2 = unet_config_to_diffusers(SD2)
    assert d2["attention_head_dim"] == [5, 10, 20, 20] and d2["use_linear_projection"] is True
    assert unet_config_from_diffusers(d2) == SD2
    pooled = unet_config_to_diffusers(CONFIGS["pooled"])
    assert pooled["class_embed_type"] == "projection" and pooled["projection_class_embeddings_input_dim"] == 12
    assert unet_config_to_diffusers(CONFIGS["classes"])["num_class_embeds"] == 10
    assert unet_config_to_diffusers(CONFIGS["learn_sigma"])["out_channels"] == 6


def test_unsupported_and_mismatching_inputs_raise():
    sdxl_like = {**unet_config_to_diffusers(SD1), "addition_embed_type": "text_time", "addition_time_embed_dim": 256}
    with pytest.raises(ConfigError, match="addition_embed_type"):
        unet_config_from_diffusers(sdxl_like)
    with pytest.raises(ConfigError, match="attention_head_dim"):
        unet_config_from_diffusers({**unet_config_to_diffusers(SD1), "attention_head_dim": [5, 7, 20, 20]})
    with pytest.raises(ConfigError, match="context_dim"):
        unet_config_to_diffusers(UNetConfig(context_dim=None))
    config = CONFIGS["sd1"]
    sd = _random_native(config)
    sd["input_blocks.9.0.in_layers.0.weight"] = torch.zeros(1)  # a block this config does not have
    with pytest.raises(CheckpointError, match="input_blocks.9.0"):
        unet_original_to_diffusers(sd, config)

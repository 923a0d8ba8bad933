"""Key maps: equal to diffusers' single-file converters, exact round trips, and outputs preserved across formats."""
import pytest
import torch
from helpers import assert_close_to_ref, realistic_weights

from ldm.errors import CheckpointError, ConfigError
from ldm.io.keys_text import hf_clip_config_from_openclip, hf_clip_to_openclip, openclip_to_hf_clip
from ldm.io.keys_vae import (vae_config_from_diffusers, vae_config_to_diffusers, vae_diffusers_to_original,
                             vae_original_to_diffusers)
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.text_encoders import OpenCLIPTextEncoder, build_openclip_model

VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, resolution=32, z_channels=4, embed_dim=4)


def _random_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Distinct values for every key: enough for key maps, which move tensors and never compute with them."""
    return {k: torch.randn_like(v) for k, v in module.state_dict().items()}


def test_vae_map_equals_diffusers_converter_and_round_trips():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = _random_state_dict(AutoencoderKL(VAE))
    ours = vae_original_to_diffusers(sd, VAE)
    theirs = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in sd.items()},
                                        vae_config_to_diffusers(VAE))
    assert ours.keys() == theirs.keys() and len(ours) == len(sd)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert ours["decoder.up_blocks.0.upsamplers.0.conv.weight"] is sd["decoder.up.2.upsample.conv.weight"]
    assert ours["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    back = vae_diffusers_to_original(ours, VAE)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    AutoencoderKL(VAE).load_state_dict(back, strict=True)


def test_vae_config_translation():
    config = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=64, scale_factor=0.13025,
                               shift_factor=0.0609)
    assert vae_config_from_diffusers(vae_config_to_diffusers(config)) == config
    sd15 = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215}
    assert vae_config_from_diffusers(sd15) == AutoencoderConfig(resolution=512)
    with pytest.raises(ConfigError, match="attn_resolutions"):
        vae_config_to_diffusers(AutoencoderConfig(attn_resolutions=(32,)))
    with pytest.raises(ConfigError, match="latents_mean"):
        vae_config_from_diffusers({**sd15, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    with pytest.raises(CheckpointError, match="no mapping"):
        vae_original_to_diffusers({"encoder.down.0.attn.0.q.weight": torch.zeros(1)}, AutoencoderConfig())


def _openclip(layers: int, width: int = 32, embed_dim: int = 24) -> OpenCLIPTextEncoder:
    cfg = dict(embed_dim=embed_dim, text_cfg=dict(width=width, heads=4, layers=layers, context_length=77,
                                                   vocab_size=49408))
    return realistic_weights(OpenCLIPTextEncoder(build_openclip_model(cfg)))


def test_openclip_map_equals_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    # SD-2's depth (24 blocks): diffusers drops resblocks.23 and text_projection, as drop_last_layer does.
    sd = _openclip(layers=24, width=16, embed_dim=16).state_dict()
    theirs = convert_open_clip_checkpoint(None, {"cond_stage_model." + k: v for k, v in sd.items()})
    ours = openclip_to_hf_clip(sd)
    assert ours.keys() == theirs.keys() and "text_model.encoder.layers.22.mlp.fc2.bias" in ours
    assert "text_model.encoder.layers.23.mlp.fc2.bias" not in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # a shallow tower: diffusers' ignore list only names block 23, so it keeps every block
    sd = _openclip(layers=2).state_dict()
    theirs = convert_open_clip_checkpoint(None, {"cond_stage_model." + k: v for k, v in sd.items()})
    ours = openclip_to_hf_clip(sd, drop_last_layer=False)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_converted_hf_model_reproduces_openclip_penultimate():
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = _openclip(layers=3)
    cfg = hf_clip_config_from_openclip({"embed_dim": 24, "text_cfg": {"width": 32, "heads": 4, "layers": 3}})
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_act"] == "gelu" and cfg["intermediate_size"] == 128
    hf = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    hf.load_state_dict(openclip_to_hf_clip(encoder.state_dict(), hf_prefix=""), strict=True)
    prompts = ["a photo of a cat", ""]
    ids = open_clip.get_tokenizer("ViT-H-14")(prompts)
    with torch.no_grad():
        hidden = hf(ids).last_hidden_state
    out = encoder.encode(prompts)
    assert_close_to_ref(out.tokens, hidden)

    # Back to open_clip: the dropped block returns as an identity block; penultimate and last both equal HF.
    back = hf_clip_to_openclip(hf.state_dict(), text_projection=encoder.model.text_projection.detach())
    restored = OpenCLIPTextEncoder(build_openclip_model({"embed_dim": 24, "text_cfg": {
        "width": 32, "heads": 4, "layers": 3, "vocab_size": 49408}}))
    restored.load_state_dict(back, strict=True)
    assert_close_to_ref(restored.encode(prompts).tokens, hidden)
    last = OpenCLIPTextEncoder(restored.model, layer="last")
    assert_close_to_ref(last.encode(prompts).tokens, hidden)
    original = encoder.state_dict()
    for key, value in back.items():
        if ".resblocks.2." not in key and key != "model.logit_scale":
            assert torch.equal(value, original[key]), key


def test_openclip_round_trip_without_dropping_is_exact():
    sd = _openclip(layers=2).state_dict()
    hf = openclip_to_hf_clip(sd, drop_last_layer=False)
    back = hf_clip_to_openclip(hf, pad_last_layer=False, text_projection=sd["model.text_projection"])
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd if k != "model.logit_scale")
    with pytest.raises(CheckpointError, match="no open_clip text tower"):
        openclip_to_hf_clip(hf)

"""Architecture inference from original SD checkpoints (shapes or original YAML), and EMA selection."""
import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import tiny_components, tiny_configs

from ldm.config import load_yaml, to_plain
from ldm.io.checkpoint import write_safetensors
from ldm.io.components import autoencoder_config, text_config_from_dims, unet_config
from ldm.io.formats import load_model
from ldm.io.infer import (infer_original_config, infer_text_encoder, infer_unet, original_config_from_sections,
                          sections_from_original_config, select_ema)
from ldm.io.original_format import original_state_dict
from ldm.models.autoencoder import AutoencoderConfig
from ldm.models.unet import UNetConfig, UNetModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_tiny_checkpoints_infer_their_own_architecture(kind):
    components = tiny_components(kind)
    config, notes = infer_original_config(original_state_dict(components))
    sections = sections_from_original_config(config)
    assert unet_config(sections["unet"]) == components.unet.config
    assert autoencoder_config(sections["autoencoder"]) == dataclasses.replace(components.autoencoder.config,
                                                                              resolution=256)
    dims = infer_text_encoder(original_state_dict(components))
    text = text_config_from_dims(dims)
    expected_text = components.config["text_encoder"]
    assert text.type == expected_text["type"] and text.layer == expected_text["layer"]
    if kind == "sd1":
        assert text.hf_config == expected_text["hf_config"]
        assert config["model"]["params"]["cond_stage_config"]["target"].endswith("FrozenCLIPEmbedder")
    else:
        assert text.open_clip == expected_text["open_clip"]
        assert config["model"]["params"]["cond_stage_config"]["target"].endswith("FrozenOpenCLIPEmbedder")
    assert any(f"SD-{kind[-1]}.x-style" in n for n in notes)
    said = {"sd1": "prediction type: eps (inferred from the shapes: SD-1.x models are eps); override with "
                   "--prediction-type",  # SD-2's shapes cannot tell: without ldm.io.sd2_prediction's rule, said out loud
            "sd2": "prediction type cannot be read from the weights; assumed eps"}[kind]
    assert any(said in n for n in notes), notes
    assert sections["scheduler"]["prediction_type"] == "epsilon"


@pytest.mark.parametrize("overrides", [
    dict(in_channels=9, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(4, 1)),  # inpainting
    dict(transformer_depth=2, context_dim=48),
    dict(transformer_depth=(1, 3), attention_resolutions=(2, 1), adm_in_channels=12),
    dict(num_classes=5, conv_resample=False),
])
def test_unet_dims_from_shapes(overrides):
    cfg = tiny_configs("sd1", **overrides)[0]
    sd = {"model.diffusion_model." + k: v for k, v in UNetModel(cfg).state_dict().items()}
    assert unet_config(infer_unet(sd)) == cfg
    # and the original YAML layout carries the same architecture (adm -> num_classes: sequential, ...)
    layout = original_config_from_sections(to_plain(cfg), to_plain(AutoencoderConfig()), "clip", "last", {})
    assert unet_config(sections_from_original_config(layout)["unet"]) == cfg


def test_original_yaml_configs_describe_sd1_and_sd2():
    v1 = sections_from_original_config(load_yaml(CONFIGS / "sd-v1-inference.yaml"))
    assert unet_config(v1["unet"]) == UNetConfig()  # our defaults are SD-1's
    assert autoencoder_config(v1["autoencoder"]) == AutoencoderConfig()
    assert v1["text_encoder"] == {"type": "clip", "layer": "last", "max_length": 77}
    assert v1["scheduler"] == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                               "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
                               "set_alpha_to_one": False, "clip_sample": False}
    v2 = sections_from_original_config(load_yaml(CONFIGS / "sd-v2-inference.yaml"), prediction_type="v_prediction")
    u2 = unet_config(v2["unet"])
    assert (u2.num_heads, u2.num_head_channels, u2.context_dim, u2.use_linear_in_transformer) == (-1, 64, 1024, True)
    assert u2.heads_for(1280) == (20, 64)
    assert v2["text_encoder"] == {"type": "openclip", "layer": "penultimate"}
    assert v2["scheduler"]["prediction_type"] == "v_prediction"


def _with_ema(sd, offset=1.0):
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            ema["model_ema." + k[len("model."):].replace(".", "")] = v + offset
    return {**sd, **ema}


def test_ema_weights_are_preferred(tmp_path):
    components = tiny_components("sd1")
    sd = original_state_dict(components)
    path = tmp_path / "ema.safetensors"
    write_safetensors(_with_ema(sd), path)
    loaded = load_model(path)
    assert torch.equal(loaded.unet.out[2].weight, components.unet.out[2].weight + 1.0)
    assert torch.equal(loaded.autoencoder.decoder.conv_out.weight, components.autoencoder.decoder.conv_out.weight)
    assert "EMA weights found and used for the U-Net" in loaded.notes

    partial = _with_ema(sd)
    del partial["model_ema.diffusion_modelout2weight"]
    chosen, used = select_ema(partial)
    key = "model.diffusion_model.out.2.weight"
    assert not used and torch.equal(chosen[key], sd[key])
    assert not any(k.startswith("model_ema") for k in chosen)


def test_no_ema_takes_the_non_ema_weights_as_diffusers_from_single_file_does(tmp_path, capsys):
    """`ema=False` / `--no-ema`: a file holding both sets gives its non-EMA U-Net (diffusers' `extract_ema=False`,
    its default, and A1111); the EMA keys are dropped, and a note says so. Through load_model, load_pipeline,
    ldm-convert and ldm-txt2img."""
    from ldm.cli.convert import main as convert
    from ldm.pipeline.load import load_pipeline

    components = tiny_components("sd1")
    sd = original_state_dict(components)
    path = tmp_path / "both.safetensors"
    write_safetensors(_with_ema(sd), path)
    plain = load_model(path, ema=False)
    assert torch.equal(plain.unet.out[2].weight, components.unet.out[2].weight)
    assert any("not used (--no-ema)" in note for note in plain.notes)
    pipe = load_pipeline(path, device="cpu", ema=False)
    assert torch.equal(pipe.stages[0].unet.out[2].weight, components.unet.out[2].weight)
    assert convert([str(path), str(tmp_path / "plain"), "--to", "native", "--no-ema"]) == 0
    assert torch.equal(load_model(tmp_path / "plain").unet.out[2].weight, components.unet.out[2].weight)
    assert convert([str(path), str(tmp_path / "ema"), "--to", "native"]) == 0
    assert torch.equal(load_model(tmp_path / "ema").unet.out[2].weight, components.unet.out[2].weight + 1.0)


def test_explicit_yaml_config_and_prediction_override(tmp_path):
    """An original YAML fixes the architecture; text sizes still come from the weights."""
    from ldm.config import save_yaml
    from ldm.io.formats import original_config

    components = tiny_components("sd2")
    path = tmp_path / "m.safetensors"
    write_safetensors(original_state_dict(components), path)  # no ldm metadata: shapes or YAML only
    config = original_config(components)
    config["model"]["params"]["unet_config"]["params"]["num_head_channels"] = 16
    save_yaml(config, tmp_path / "other.yaml")
    loaded = load_model(path, config=tmp_path / "other.yaml", prediction_type="sample")
    assert loaded.unet.config.num_head_channels == 16  # from the YAML, not the SD-2 convention (32 here)
    assert loaded.schedule.prediction_type == "sample"
    assert loaded.config["text_encoder"]["open_clip"]["text_cfg"]["layers"] == 3
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([5.0]), torch.randn(1, 3, 32)
    with torch.no_grad():  # same weights, another head split: other outputs (the YAML was obeyed)
        assert (loaded.unet(x, t, ctx) - components.unet(x, t, ctx)).abs().max() > 1e-3


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_sd_architectures_infer_like_the_yaml(version):
    """Real SD-1 / SD-2 layouts (meta tensors: shapes without memory) infer to what the original YAML says."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.text_encoders import TextEncoderConfig, build_text_encoder

    sections = sections_from_original_config(load_yaml(CONFIGS / f"sd-{version}-inference.yaml"))
    unet_cfg, vae_cfg = unet_config(sections["unet"]), autoencoder_config(sections["autoencoder"])
    text_cfg = TextEncoderConfig(type=sections["text_encoder"]["type"])
    with torch.device("meta"):
        parts = {"model.diffusion_model.": UNetModel(unet_cfg), "first_stage_model.": AutoencoderKL(vae_cfg),
                 "cond_stage_model.": build_text_encoder(text_cfg)}
    sd = {prefix + k: v for prefix, m in parts.items() for k, v in m.state_dict().items()}
    config, notes = infer_original_config(sd)
    inferred = sections_from_original_config(config)
    assert unet_config(inferred["unet"]) == unet_cfg
    assert autoencoder_config(inferred["autoencoder"]) == vae_cfg
    dims = infer_text_encoder(sd)
    if version == "v1":  # OpenAI CLIP ViT-L/14 text tower
        assert (dims["type"], dims["width"], dims["layers"], dims["heads"]) == ("clip", 768, 12, 12)
        assert text_config_from_dims(dims).hf_config == {
            "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "projection_dim": 768}
    else:  # OpenCLIP ViT-H/14 text tower
        assert (dims["type"], dims["width"], dims["layers"], dims["heads"], dims["embed_dim"]) == \
            ("openclip", 1024, 24, 16, 1024)
        assert dims["context_length"] == 77 and dims["vocab_size"] == 49408

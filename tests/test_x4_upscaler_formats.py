"""The x4 upscaler loads from a diffusers StableDiffusionUpscalePipeline folder and from the original single file
(with its x4-upscaling.yaml, or inferred from the keys); `ldm-convert` round-trips native <-> diffusers <->
original bitwise; a file that fits no layout is refused naming the keys it could not place."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import OPENCLIP, realistic_weights
from safetensors.torch import load_file
from upscaler_helpers import X4_ORIGINAL_UNET, tiny_diffusers_upscale_pipeline

from ldm.cli.convert import main as convert
from ldm.config import load_yaml
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import CheckpointError
from ldm.io.checkpoint import write_safetensors
from ldm.io.components import ModelParts, config_sections
from ldm.io.formats import load_model, save_native
from ldm.io.infer import UNET_PREFIX, infer_unet, sections_from_original_config
from ldm.io.original_format import original_state_dict, save_original
from ldm.io.part_types import unet_config
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.text_encoders import TextEncoderConfig, build_text_encoder
from ldm.models.unet import UNetConfig, UNetModel

pytest.importorskip("diffusers")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
UPSCALE = {"noise_level": 20, "max_noise_level": 350, "num_train_timesteps": 1000, "beta_start": 0.0001,
           "beta_end": 0.02, "beta_schedule": "scaled_linear"}


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("x4-formats") / "diffusers"
    tiny_diffusers_upscale_pipeline().save_pretrained(folder)
    return folder


def _weights(folder: Path) -> dict:
    """Every tensor of a diffusers folder, by `part/key` (CLIP's keys with or without transformers' `text_model.`:
    transformers 5 writes them without it, and reads both)."""
    out = {}
    for file in sorted(folder.glob("*/*.safetensors")):
        out.update({f"{file.parent.name}/{k.removeprefix('text_model.')}": v for k, v in load_file(file).items()})
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_ldm_convert_round_trips_bitwise(diffusers_folder, tmp_path):
    native, original, back = tmp_path / "native", tmp_path / "x4.safetensors", tmp_path / "back"
    assert convert([str(diffusers_folder), str(native), "--to", "native"]) == 0
    assert convert([str(native), str(original), "--to", "original"]) == 0
    assert convert([str(original), str(back), "--to", "diffusers"]) == 0
    assert _same(_weights(back), _weights(diffusers_folder))  # diffusers -> native -> original -> diffusers
    index = json.loads((back / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
    low_res = json.loads((back / "low_res_scheduler" / "scheduler_config.json").read_text())
    assert (low_res["beta_schedule"], low_res["beta_start"], low_res["beta_end"]) == ("scaled_linear", 1e-4, 0.02)

    yaml = load_yaml(original.with_suffix(".yaml"))["model"]
    assert yaml["target"].endswith("LatentUpscaleDiffusion") and yaml["params"]["conditioning_key"] == "hybrid-adm"
    assert yaml["params"]["low_scale_config"]["params"]["max_noise_level"] == 350
    assert yaml["params"]["unet_config"]["params"]["disable_self_attentions"] == [True, True, False]
    native_again = tmp_path / "native-again"
    assert convert([str(original), str(native_again), "--to", "native"]) == 0  # native -> original -> native
    for name in ("unet", "autoencoder", "text_encoder"):
        assert _same(load_file(native_again / f"{name}.safetensors"), load_file(native / f"{name}.safetensors"))
    parts = [load_model(p) for p in (diffusers_folder, native, original, back, native_again)]
    for p in parts:
        assert p.config["latent_upscale"] == UPSCALE and p.config["unet"] == parts[0].config["unet"]
        assert p.schedule.prediction_type == "v_prediction" and p.autoencoder.config.scale_factor == 0.08333


def test_the_original_file_loads_with_its_yaml_beside_it(diffusers_folder, tmp_path):
    parts = load_model(diffusers_folder)
    path = tmp_path / "x4-upscaler-ema.safetensors"
    save_original(parts, path)
    write_safetensors(original_state_dict(parts), path)  # as Stability ships it: no config stored in the file
    loaded = load_model(path)
    assert any(n.startswith(f"architecture from {path.with_suffix('.yaml')}") for n in loaded.notes)
    assert loaded.config["latent_upscale"] == UPSCALE and loaded.unet.config == parts.unet.config
    # the CompVis layout holds the betas and the parameterisation (its DDIM conventions fix the rest)
    for name in ("beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert getattr(loaded.schedule, name) == getattr(parts.schedule, name)
    assert _same(loaded.unet.state_dict(), parts.unet.state_dict())


def test_the_shipped_yaml_describes_the_full_size_x4_upscaler():
    sections = sections_from_original_config(load_yaml(CONFIGS / "x4-upscaling.yaml"))
    config = unet_config(sections["unet"])
    assert config == unet_config({**X4_ORIGINAL_UNET, "sample_size": 128})
    assert sections["autoencoder"]["scale_factor"] == 0.08333 and sections["scheduler"]["beta_end"] == 0.02
    assert sections["scheduler"]["prediction_type"] == "v_prediction"
    # and the full-size U-Net's keys alone infer the same architecture
    with torch.device("meta"):
        sd = {UNET_PREFIX + k: v for k, v in UNetModel(config).state_dict().items()}
    inferred = infer_unet(sd)
    inferred.pop("num_head_channels")
    built = unet_config({**inferred, "num_heads": 8, "sample_size": 128})

    def attending(c):  # the flags of the levels that have attention (level 0 has none: its flag means nothing)
        return [flag for level, flag in enumerate(c.disable_self_attentions) if 2**level in c.attention_resolutions]

    assert set(built.attention_resolutions) == set(config.attention_resolutions)
    assert attending(built) == attending(config) == [True, True, False]
    assert dataclasses.replace(built, attention_resolutions=config.attention_resolutions,
                               disable_self_attentions=config.disable_self_attentions) == config


def _tiny_x4_parts(seed=0) -> ModelParts:
    """A tiny x4 upscaler whose text (32 wide) is narrower than every attention level (64, 128): keys alone tell
    where attn1 reads the text."""
    unet = UNetConfig(in_channels=7, out_channels=4, model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1,
                      attention_resolutions=(4, 2), num_heads=8, context_dim=32, use_linear_in_transformer=True,
                      num_classes=1000, disable_self_attentions=(False, True, False), sample_size=128)
    vae = AutoencoderConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, resolution=256, scale_factor=0.08333)
    text = TextEncoderConfig(type="openclip", layer="penultimate", open_clip=OPENCLIP)
    schedule = ScheduleConfig(beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction", steps_offset=1,
                              set_alpha_to_one=False)
    config = config_sections({"unet": unet, "autoencoder": vae, "text_encoder": text}, schedule)
    config["latent_upscale"] = dict(UPSCALE)
    return ModelParts(unet=realistic_weights(UNetModel(unet), seed), autoencoder=AutoencoderKL(vae),
                      text_encoder=build_text_encoder(text), schedule=schedule, config=config)


def test_a_bare_original_file_is_recognised_as_the_x4_upscaler_from_its_keys(tmp_path):
    parts = _tiny_x4_parts()
    path = tmp_path / "bare.safetensors"
    write_safetensors(original_state_dict(parts), path)  # no YAML, no stored config
    loaded = load_model(path)
    assert any("SD x4 upscaler" in n for n in loaded.notes)
    assert loaded.unet.config == parts.unet.config  # disable_self_attentions and 8 heads included
    assert loaded.config["latent_upscale"] == UPSCALE
    assert loaded.autoencoder.config.scale_factor == 0.08333 and loaded.schedule.prediction_type == "v_prediction"
    assert (loaded.schedule.beta_start, loaded.schedule.beta_end) == (1e-4, 0.02)
    assert _same(loaded.unet.state_dict(), parts.unet.state_dict())
    native = tmp_path / "native"
    save_native(loaded, native)
    assert load_model(native).config["latent_upscale"] == UPSCALE


def test_a_file_that_fits_no_layout_names_the_keys_it_could_not_place(tmp_path):
    path = tmp_path / "mystery.safetensors"
    write_safetensors({"encoder.layer.0.weight": torch.zeros(2), "head.bias": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"could not place: \['encoder.layer.0.weight', 'head.bias'\]"):
        load_model(path)
    parts = _tiny_x4_parts()
    sd = original_state_dict(parts)
    sd[UNET_PREFIX + "extra_block.weight"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    write_safetensors(sd, path)
    with pytest.raises(CheckpointError, match="extra_block.weight"):
        load_model(path)

"""A model is named parts plus a schedule: the registry, the codec contract, what each format can hold, the manifest."""
import os

import pytest
import torch

from ldm.config import load_yaml, save_yaml
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import CheckpointError, ConfigError, LdmError
from ldm.io.components import ModelParts, config_sections
from ldm.io.formats import load_model, save
from ldm.io.native_format import MANIFEST, export_native, save_native
from ldm.models.codecs import IdentityCodec, KLCodec
from ldm.models.unet import UNetConfig, UNetModel
from helpers import tiny_components


def pixel_model() -> ModelParts:
    """A pixel-space model: a U-Net on RGB images, no autoencoder, no text encoder."""
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(), context_dim=None, sample_size=16)
    schedule = ScheduleConfig()
    return ModelParts(unet=UNetModel(cfg).eval(), schedule=schedule,
                      config=config_sections({"unet": cfg}, schedule), source="pixel")


def test_parts_are_held_by_role_and_the_codec_follows_the_autoencoder():
    parts = tiny_components()
    assert parts.roles == ["unet", "autoencoder", "text_encoder"]
    assert parts["unet"] is parts.unet and parts.get("autoencoder") is parts.autoencoder
    codec = parts.codec
    assert isinstance(codec, KLCodec) and codec.downsample_factor == 2 and codec.latent_channels == 4
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = codec.encode(x)
        expected = parts.autoencoder.encode(x).mode() * parts.autoencoder.config.scale_factor
        torch.testing.assert_close(z, expected)
        torch.testing.assert_close(codec.decode(z), parts.autoencoder.decode_latents(z))
        # A posterior draw from a generator: mean + std * the generator's next normal draw.
        posterior = parts.autoencoder.encode(x)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
        drawn = codec.encode(x, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(drawn, (posterior.mean + posterior.std * noise) * 0.18215)

    pixel = pixel_model()
    assert pixel.autoencoder is None and pixel.text_encoder is None
    assert isinstance(pixel.codec, IdentityCodec) and pixel.codec.downsample_factor == 1
    assert torch.equal(pixel.codec.decode(pixel.codec.encode(x)), x)
    with pytest.raises(ConfigError, match="no 'text_encoder' part"):
        pixel["text_encoder"]


def test_a_pixel_model_round_trips_through_the_native_format_without_an_autoencoder_file(tmp_path):
    model = pixel_model()
    save_native(model, tmp_path / "pixel", step=7)
    files = sorted(p.name for p in (tmp_path / "pixel").iterdir())
    assert files == ["config.yaml", MANIFEST, "unet.safetensors"]
    assert "type" not in load_yaml(tmp_path / "pixel" / "config.yaml")["unet"]  # old readers see an ordinary U-Net
    loaded = load_model(tmp_path / "pixel")
    assert loaded.roles == ["unet"] and isinstance(loaded.codec, IdentityCodec)
    for (k, a), b in zip(model.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b), k
    assert "step 7" in loaded.notes[0]
    assert oct(os.stat(tmp_path / "pixel" / "unet.safetensors").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_unknown_section_type_is_a_config_error_naming_the_known_types(tmp_path):
    save_native(pixel_model(), tmp_path / "m")
    config = load_yaml(tmp_path / "m" / "config.yaml")
    config["unet"]["type"] = "imagen_unet"
    save_yaml(config, tmp_path / "m" / "config.yaml")
    with pytest.raises(ConfigError, match="unknown type 'imagen_unet'; known types: unet, autoencoder_kl"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("to", ["original", "diffusers"])
def test_formats_that_cannot_hold_a_pixel_model_say_so_and_write_nothing(tmp_path, to):
    dst = tmp_path / ("out.safetensors" if to == "original" else "out")
    with pytest.raises(LdmError, match="has no autoencoder or text_encoder part .*--to native"):
        save(pixel_model(), dst, to)
    assert not dst.exists()


def test_an_edm_model_to_the_original_format_is_refused_with_the_reason(tmp_path, capsys):
    from ldm.cli.convert import main

    parts = tiny_components()
    parts.schedule = ScheduleConfig(prediction_type="edm")
    parts.config["scheduler"] = {"prediction_type": "edm"}
    with pytest.raises(LdmError, match="cannot hold an EDM model"):
        save(parts, tmp_path / "edm.safetensors", "original")
    save_native(parts, tmp_path / "edm")
    assert main([str(tmp_path / "edm"), str(tmp_path / "edm.safetensors"), "--to", "original"]) == 2  # was KeyError
    assert "error: the original single-file format cannot hold an EDM model" in capsys.readouterr().err
    assert not (tmp_path / "edm.safetensors").exists()


def test_an_export_cut_short_is_refused_naming_the_file_that_does_not_match(tmp_path, monkeypatch):
    """Issue 8 defect 7: a crash during the export must not leave step-70 weights beside step-60 ones silently."""
    run = tmp_path / "run"
    first = tiny_components(seed=0)
    export_native(first, run, step=60)
    assert load_model(run).notes[0].endswith("(exported at step 60)")

    second = tiny_components(seed=10)
    real_replace = os.replace
    moved = []

    def crash_after_the_autoencoder(src, dst):  # step 70's first file arrives in the run folder, then the kill
        real_replace(src, dst)
        if os.path.dirname(dst) == str(run):
            moved.append(os.path.basename(dst))
            if os.path.basename(dst) == "autoencoder.safetensors":
                raise KeyboardInterrupt("killed during the export")

    monkeypatch.setattr(os, "replace", crash_after_the_autoencoder)
    with pytest.raises(KeyboardInterrupt):
        export_native(second, run, step=70)
    monkeypatch.setattr(os, "replace", real_replace)
    assert moved == [MANIFEST, "autoencoder.safetensors"]
    with pytest.raises(CheckpointError, match=r"text_encoder.safetensors does not match .*manifest.json \(step 70\)"):
        load_model(run)

    export_native(second, run, step=70)  # the next export heals the folder
    loaded = load_model(run)
    assert torch.equal(loaded.text_encoder.state_dict()["transformer.text_model.final_layer_norm.weight"],
                       second.text_encoder.state_dict()["transformer.text_model.final_layer_norm.weight"])


def test_a_truncated_weights_file_is_named(tmp_path):
    save_native(tiny_components(), tmp_path / "m", step=1)
    path = tmp_path / "m" / "autoencoder.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="autoencoder.safetensors does not match"):
        load_model(tmp_path / "m")


def test_a_shared_text_tower_path_cannot_leave_the_model_or_name_a_pickle(tmp_path):
    """`text_encoder.pretrained` of a native folder names a .safetensors beside it, never any file on disk."""
    from ldm.io.native_format import shared_text_weights
    from ldm.models.text_encoders import TextEncoderConfig

    folder = tmp_path / "models" / "m"
    folder.mkdir(parents=True)
    (tmp_path / "models" / "clip.safetensors").write_bytes(b"x")
    assert shared_text_weights(folder, TextEncoderConfig(type="openclip", pretrained="../clip.safetensors")).is_file()
    for bad in ("../../secret.safetensors", "/etc/passwd", "../clip.ckpt"):
        with pytest.raises(CheckpointError, match="must be a relative path to a .safetensors file"):
            shared_text_weights(folder, TextEncoderConfig(type="openclip", pretrained=bad))

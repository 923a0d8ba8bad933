"""Building the trainable model: pretrained weights from a single-file checkpoint, the SD-1/SD-2 training configs."""
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN_MODEL

from ldm.config import from_dict, load_yaml
from ldm.errors import ConfigError
from ldm.models.unet import UNetConfig
from ldm.train.config import ModelConfig, TrainConfig
from ldm.train.model import build_parts, latents_from_posterior

ROOT = Path(__file__).resolve().parents[1]


def test_pretrained_components_from_an_original_checkpoint(tmp_path):
    from ldm.io.components import SDComponents, resolved_config
    from ldm.io.original_format import save_original

    torch.manual_seed(1)
    source = build_parts(from_dict(ModelConfig, {**TINY_TRAIN_MODEL, "random_autoencoder": True}))
    components = SDComponents(source.unet, source.autoencoder, source.text_encoder, source.schedule,
                              resolved_config(source.unet.config, source.autoencoder.config,
                                              source.text_encoder_config, source.schedule), "test")
    save_original(components, tmp_path / "sd.safetensors", write_yaml=False)

    torch.manual_seed(2)  # different random init: every weight must come from the file
    path = str(tmp_path / "sd.safetensors")
    parts = build_parts(from_dict(ModelConfig, {**TINY_TRAIN_MODEL, "pretrained": {"unet": path, "autoencoder": path,
                                                                      "text_encoder": path}}))
    for name in ("unet", "autoencoder", "text_encoder"):
        expected, got = getattr(source, name).state_dict(), getattr(parts, name).state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    assert parts.unet.training and all(p.requires_grad for p in parts.unet.parameters())
    assert not any(p.requires_grad for p in parts.autoencoder.parameters())
    assert not parts.train_text_encoder  # CLIP stays frozen


def test_random_autoencoder_needs_an_explicit_switch():
    with pytest.raises(ConfigError, match="pretrained.autoencoder is required"):
        build_parts(from_dict(ModelConfig, TINY_TRAIN_MODEL))


def test_context_dim_must_match_the_text_encoder():
    bad = {**TINY_TRAIN_MODEL, "unet": {**TINY_TRAIN_MODEL["unet"], "context_dim": 64}, "random_autoencoder": True}
    with pytest.raises(ConfigError, match="context_dim"):
        build_parts(from_dict(ModelConfig, bad))


def test_latents_from_posterior_applies_shift_and_scale():
    from ldm.models.autoencoder import AutoencoderConfig

    cfg = AutoencoderConfig(scale_factor=0.5, shift_factor=0.1)
    mean, std, eps = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5])
    assert latents_from_posterior(cfg, mean, std, eps).item() == pytest.approx((1.0 + 2.0 * 0.5 - 0.1) * 0.5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_sd_training_configs_match_the_published_architectures(version):
    config = from_dict(TrainConfig, load_yaml(ROOT / "configs" / f"sd-{version}.yaml"))
    unet = from_dict(UNetConfig, config.model.unet)
    original = load_yaml(ROOT / "configs" / f"sd-{version}-inference.yaml")["model"]["params"]
    params = original["unet_config"]["params"]
    for key in ("model_channels", "attention_resolutions", "num_res_blocks", "channel_mult", "context_dim"):
        assert list(getattr(unet, key)) == list(params[key]) if isinstance(params[key], list) \
            else getattr(unet, key) == params[key], key
    assert unet.heads_for(320) == ((8, 40) if version == "v1" else (5, 64))
    assert unet.use_linear_in_transformer == (version == "v2") and unet.use_checkpoint
    assert config.model.autoencoder["scale_factor"] == original["scale_factor"]
    assert config.model.text_encoder["type"] == ("clip" if version == "v1" else "openclip")
    assert config.model.schedule["beta_start"] == original["linear_start"]
    assert config.model.pretrained.autoencoder is None and not config.model.random_autoencoder  # must be given


@pytest.mark.parametrize("name", ["imagen-tiny-sr.yaml", "tiny.yaml"])
def test_the_resolved_model_section_builds_the_same_networks_again(name):
    # DIR/train_config.yaml of an Imagen run lost `type: efficient_unet`: used as --config it was refused
    from ldm.config import to_plain

    config = from_dict(TrainConfig, load_yaml(ROOT / "configs" / name))
    parts = build_parts(config.model)
    again = build_parts(from_dict(ModelConfig, {**to_plain(config.model), **parts.resolved()}))
    assert type(again.unet) is type(parts.unet) and again.unet.config == parts.unet.config
    assert type(again.codec) is type(parts.codec)


def test_long_training_captions_are_said_to_be_cut_once_not_for_every_sample():
    # web captions often exceed the text encoder's context: every such caption of every step printed a warning
    import warnings

    from ldm.models.text_encoders import TextEncoderConfig, build_text_encoder
    from ldm.train.model import encode_captions

    encoder = build_text_encoder(TextEncoderConfig(type="small", max_length=8,
                                                   small={"width": 16, "layers": 1, "heads": 1}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            embeddings = encode_captions(encoder, [f"caption {step} {'long ' * 10}", "short"])
    cut = [str(w.message) for w in caught if "longer than 8 tokens" in str(w.message)]
    assert len(cut) == 1 and "said once per run" in cut[0], cut
    assert embeddings.tokens.shape[:2] == (2, 8)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        encode_captions(build_text_encoder(TextEncoderConfig(type="small", max_length=8, small={
            "width": 16, "layers": 1, "heads": 1})), ["another " * 10])
    assert len(again) == 1  # said once per encoder (a run), not once per process


def test_other_warnings_of_the_text_encoder_keep_their_once_per_place_filter(monkeypatch):
    # encode_captions records every warning to pick out the truncation one; the others it passes on must still be
    # shown once per place under the default filter, not at every training step
    import warnings

    from ldm.train import model as train_model

    class Encoder:
        def encode(self, captions):
            warnings.warn("some library's deprecation note", UserWarning)
            return captions

    monkeypatch.setattr(train_model, "_RELAYED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            train_model.encode_captions(Encoder(), ["a"])
    assert [str(w.message) for w in caught] == ["some library's deprecation note"]

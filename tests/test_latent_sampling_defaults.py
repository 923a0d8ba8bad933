"""A latent model's `model.stage` holds only its own sampling defaults; they reach the exported model and its pipeline."""
import pytest
from helpers import TINY_TRAIN_MODEL

from ldm.config import from_dict
from ldm.errors import ConfigError
from ldm.io.native_format import save_native
from ldm.pipeline.load import load_pipeline
from ldm.train.config import ModelConfig
from ldm.train.model import build_parts

OWN = {"steps": 7, "guidance": 2.5, "sampler": "euler"}


def test_the_sampling_defaults_travel_from_training_to_the_pipeline(tmp_path):
    parts = build_parts(from_dict(ModelConfig, {**TINY_TRAIN_MODEL, "random_autoencoder": True, "stage": OWN}))
    exported = parts.model_parts()
    assert exported.config["stage"] == OWN  # nothing of a pixel stage's sizes or thresholding
    save_native(exported, tmp_path / "model")
    pipe = load_pipeline(str(tmp_path / "model"), device="cpu")
    s = pipe.settings()
    assert (s.steps, s.guidance, s.sampler) == (7, 2.5, "euler")
    assert pipe.settings(steps=3).steps == 3
    assert pipe.stage.threshold_percentile() is None  # a latent model: no dynamic thresholding


@pytest.mark.parametrize("field", [{"low_res_size": 8}, {"aug_level": 0.1}, {"dynamic_threshold": 0.9}])
def test_a_pixel_stage_field_on_a_latent_model_is_refused(field):
    config = from_dict(ModelConfig, {**TINY_TRAIN_MODEL, "random_autoencoder": True, "stage": {**OWN, **field}})
    with pytest.raises(ConfigError, match=f"{next(iter(field))}.*autoencoder=null"):
        build_parts(config)


def test_convert_to_another_format_says_it_drops_the_sampling_defaults(tmp_path, capsys):
    from ldm.cli.convert import main

    parts = build_parts(from_dict(ModelConfig, {**TINY_TRAIN_MODEL, "random_autoencoder": True, "stage": OWN}))
    save_native(parts.model_parts(), tmp_path / "model")
    assert main([str(tmp_path / "model"), str(tmp_path / "again"), "--to", "native"]) == 0
    assert "sampling defaults" not in capsys.readouterr().err  # native keeps them
    assert load_pipeline(str(tmp_path / "again"), device="cpu").settings().steps == 7
    assert main([str(tmp_path / "model"), str(tmp_path / "pipe"), "--to", "diffusers"]) == 0
    err = capsys.readouterr().err
    assert "sampling defaults (steps 7, guidance 2.5, sampler euler)" in err and "--to native" in err

"""ldm-convert on DeepFloyd IF stages: diffusers <-> native round trips are bitwise, diffusers reads what we write,
and weights that fit no known layout are refused naming the keys."""
import json

import pytest
import torch
from helpers import assert_close_to_ref, run_cli
from if_helpers import if_pipeline
from safetensors.torch import load_file, save_file

from ldm.cli.convert import main as convert
from ldm.config import load_yaml
from ldm.io.formats import load_model

UNET, TEXT = "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("super_resolution", [False, True], ids=["IF-I", "IF-II"])
def test_diffusers_native_diffusers_is_bitwise(tmp_path, capsys, super_resolution):
    pipe, folder = if_pipeline(tmp_path, super_resolution, sample_size=16)
    native, back = tmp_path / "native", tmp_path / "back"
    assert run_cli(convert, [folder, native, "--to", "native"], capsys)[0] == 0
    assert run_cli(convert, [native, back, "--to", "diffusers"], capsys)[0] == 0
    assert _same_tensors(load_file(back / UNET), load_file(folder / UNET))
    assert _same_tensors(load_file(back / TEXT), load_file(folder / TEXT))
    original = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    written = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    for key in ("beta_schedule", "variance_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                "prediction_type", "timestep_spacing", "num_train_timesteps"):
        assert written[key] == original[key], key
    config = load_yaml(native / "config.yaml")
    assert config["unet"]["type"] == "if_unet" and config["stage"]["sampler"] == "ddpm"
    assert (config["stage"]["low_res_size"] is not None) == super_resolution

    # diffusers itself loads the folder we wrote, and its U-Net is the one it saved
    import diffusers

    cls = diffusers.IFSuperResolutionPipeline if super_resolution else diffusers.IFPipeline
    reloaded = cls.from_pretrained(back, safety_checker=None, watermarker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    x = torch.randn(1, pipe.unet.config.in_channels, 16, 16)
    kwargs = {"class_labels": torch.tensor([250])} if super_resolution else {}
    context = torch.randn(1, 5, 32)
    with torch.no_grad():  # the same weights and config: equal up to kernel-level float noise
        assert_close_to_ref(reloaded.unet(x, 7, context, **kwargs).sample, pipe.unet(x, 7, context, **kwargs).sample,
                            rel=1e-6, what="diffusers' U-Net from our folder")


def test_native_diffusers_native_is_bitwise(tmp_path, capsys):
    _, folder = if_pipeline(tmp_path, True, sample_size=16)
    native, diffusers_folder, again = tmp_path / "native", tmp_path / "diffusers", tmp_path / "again"
    for src, dst, to in ((folder, native, "native"), (native, diffusers_folder, "diffusers"), (diffusers_folder, again,
                                                                                              "native")):
        assert run_cli(convert, [src, dst, "--to", to], capsys)[0] == 0
    for name in ("unet.safetensors", "text_encoder.safetensors"):
        assert _same_tensors(load_file(again / name), load_file(native / name))
    assert load_yaml(again / "config.yaml") == load_yaml(native / "config.yaml")
    parts = load_model(again)
    assert parts.config["stage"]["resize_mode"] == "bilinear_align_corners"


def test_unknown_layout_names_the_keys(tmp_path, capsys):
    _, folder = if_pipeline(tmp_path, False, sample_size=16)
    sd = load_file(folder / UNET)
    sd["down_blocks.0.extra_adapter.weight"] = torch.zeros(2)
    save_file(sd, folder / UNET)
    code, err = run_cli(convert, [folder, tmp_path / "out", "--to", "native"], capsys)
    assert code == 2 and "down_blocks.0.extra_adapter.weight" in err
    assert not (tmp_path / "out").exists()


def test_original_format_refuses_an_if_stage(tmp_path, capsys):
    _, folder = if_pipeline(tmp_path, False, sample_size=16)
    code, err = run_cli(convert, [folder, tmp_path / "if.safetensors", "--to", "original"], capsys)
    assert code == 2 and "native" in err
    assert not (tmp_path / "if.safetensors").exists()


def test_tokenizer_from_spiece_model_alone(tmp_path):
    """The hub's IF folders hold tokenizer/spiece.model and tokenizer_config.json only (no tokenizer.json)."""
    import shutil

    pipe, folder = if_pipeline(tmp_path, False, sample_size=16)
    tokenizer = folder / "tokenizer"
    shutil.rmtree(tokenizer)
    tokenizer.mkdir()
    shutil.copy(tmp_path / "sp.model", tokenizer / "spiece.model")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 77, "eos_token": "</s>",
         "pad_token": "<pad>", "unk_token": "<unk>"}))
    parts = load_model(folder)
    got = parts.text_encoder.encode(["A photo of a Cat", ""])
    expected, negative = pipe.encode_prompt("A photo of a Cat", do_classifier_free_guidance=True, clean_caption=False)
    assert torch.equal(got.tokens[:1], expected) and torch.equal(got.tokens[1:], negative)

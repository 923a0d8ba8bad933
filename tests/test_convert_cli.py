"""ldm-convert: conversions, and bad input -> exit code 2, the file and keys named, nothing written."""

import pytest
import torch
import yaml
from helpers import tiny_components

from ldm.cli.convert import main
from ldm.io.checkpoint import read_state_dict, write_safetensors
from ldm.io.formats import load_model, original_config
from ldm.io.original_format import original_state_dict


class Payload:
    """A class object pickled beside the weights: loading it would run code from the file."""

    def __init__(self):
        self.note = "arbitrary object"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(components, original state dict, original-layout YAML path) of a tiny SD-1 model."""
    components = tiny_components("sd1")
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(original_config(components)))
    return components, original_state_dict(components), config


def _fails(capsys, argv, dst, *needles):
    capsys.readouterr()  # drop what earlier calls printed
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err
    assert not dst.exists()
    assert not any(p.name.startswith(f".{dst.name}.") for p in dst.parent.iterdir())  # no temporaries left
    return err


def test_convert_to_every_format_and_back(tiny, tmp_path, capsys):
    components, sd, _ = tiny
    src = tmp_path / "src.safetensors"
    write_safetensors(sd, src)  # a plain file: architecture read from the shapes
    assert main([str(src), str(tmp_path / "native"), "--to", "native", "--prediction-type", "v"]) == 0
    err = capsys.readouterr().err
    assert "note: architecture inferred from tensor shapes: SD-1.x-style" in err
    assert yaml.safe_load((tmp_path / "native" / "config.yaml").read_text())["scheduler"]["prediction_type"] \
        == "v_prediction"
    assert main([str(tmp_path / "native"), str(tmp_path / "pipe"), "--to", "diffusers", "--dtype", "fp16"]) == 0
    assert read_state_dict(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].dtype \
        == torch.float16
    assert main([str(tmp_path / "pipe"), str(tmp_path / "back.safetensors"), "--to", "original",
                 "--dtype", "fp32"]) == 0
    back = read_state_dict(tmp_path / "back.safetensors")
    assert set(back) == set(sd)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(back[key], sd[key].half().float())  # only the fp16 rounding in between
    assert load_model(tmp_path / "back.safetensors").schedule.prediction_type == "v_prediction"


def test_lightning_ckpt_and_pickle_flag(tiny, tmp_path, capsys):
    _, sd, _ = tiny
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 3}, ckpt)
    assert main([str(ckpt), str(tmp_path / "ok"), "--to", "native"]) == 0
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "payload": Payload()}, evil)
    _fails(capsys, [str(evil), str(tmp_path / "out"), "--to", "native"], tmp_path / "out",
           "evil.ckpt", "--allow-pickle", "Payload")
    assert main([str(evil), str(tmp_path / "out"), "--to", "native", "--allow-pickle"]) == 0


def test_missing_truncated_and_garbage_files(tiny, tmp_path, capsys):
    _, sd, _ = tiny
    dst = tmp_path / "out"
    _fails(capsys, [str(tmp_path / "none.safetensors"), str(dst), "--to", "native"], dst,
           "not found", "none.safetensors")
    good = tmp_path / "good.safetensors"
    write_safetensors(sd, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _fails(capsys, [str(cut), str(dst), "--to", "native"], dst, "cut.safetensors", "truncated or corrupt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint" * 50)
    _fails(capsys, [str(junk), str(dst), "--to", "diffusers"], dst, "junk.ckpt", "truncated or corrupt")


def test_mismatching_keys_are_named(tiny, tmp_path, capsys):
    _, sd, config = tiny
    bad = dict(sd)
    del bad["model.diffusion_model.out.0.weight"]
    bad["model.diffusion_model.surprise.weight"] = torch.zeros(3)
    bad["model.diffusion_model.time_embed.0.weight"] = torch.zeros(128, 16)
    path = tmp_path / "bad.safetensors"
    write_safetensors(bad, path)
    dst = tmp_path / "out"
    err = _fails(capsys, [str(path), str(dst), "--to", "diffusers", "--config", str(config)], dst,
                 "bad.safetensors", "U-Net", "1 missing key(s): out.0.weight", "1 unexpected key(s): surprise.weight",
                 "time_embed.0.weight (file (128, 16), model (128, 32))")
    assert "Traceback" not in err
    # without a config the shapes are read; the same mismatches are still named
    _fails(capsys, [str(path), str(dst), "--to", "native"], dst, "bad.safetensors", "out.0.weight")
    vae_only = {k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")}
    write_safetensors(vae_only, tmp_path / "vae_only.safetensors")
    _fails(capsys, [str(tmp_path / "vae_only.safetensors"), str(dst), "--to", "native"], dst,
           "vae_only.safetensors", "model.diffusion_model")


def test_offline_hub_id_and_existing_destination(tiny, tmp_path, capsys, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dst = tmp_path / "out"
    _fails(capsys, ["nobody-here/no-such-model", str(dst), "--to", "native"], dst,
           "nobody-here/no-such-model", "pass the local folder")
    assert no_network == []  # offline means offline: no lookup, no connection, so no waiting on a timeout
    _, sd, _ = tiny
    src = tmp_path / "src.safetensors"
    write_safetensors(sd, src)
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main([str(src), str(dst), "--to", "native"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (dst / "keep.txt").read_text() == "mine"
    assert main([str(src), str(tmp_path / "x.ckpt"), "--to", "original"]) == 2
    assert ".safetensors" in capsys.readouterr().err and not (tmp_path / "x.ckpt").exists()


def test_files_mistaken_for_a_model_say_what_they_are_and_the_way_out(tiny, tmp_path, capsys):
    """A LoRA, a VAE alone (with or without its prefix), a textual-inversion embedding, a diffusers component file,
    a U-Net without its autoencoder and text encoder: exit 2, the kind named with the way out, nothing written."""
    _, sd, _ = tiny
    vae = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    files = {
        "kohya_lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, "LoRA"),
        "peft_lora": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)}, "LoRA"),
        "vae": (vae, "--vae FILE"),
        "bare_vae": ({k.removeprefix("first_stage_model."): v for k, v in vae.items()}, "--vae FILE"),
        "embedding": ({"emb_params": torch.zeros(2, 32)}, "textual-inversion embedding"),
        "diffusers_unet": ({"conv_in.weight": torch.zeros(32, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight":
                            torch.zeros(32, 32, 3, 3)}, "pass the pipeline folder"),
        "unet_only": ({k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")},
                      "without the autoencoder (first_stage_model.*) and the text encoder (cond_stage_model.*)"),
    }
    dst = tmp_path / "out"
    for name, (weights, needle) in files.items():
        write_safetensors(weights, tmp_path / f"{name}.safetensors")
        _fails(capsys, [str(tmp_path / f"{name}.safetensors"), str(dst), "--to", "native"], dst,
               f"{name}.safetensors", needle)


def test_a_yaml_of_the_other_family_is_named_as_such(tiny, tmp_path, capsys):
    """An SDXL file with an SD-1 YAML, an SD-1 file with an SDXL (sgm) YAML: both families named, exit 2."""
    from sdxl_helpers import save_diffusers_sdxl

    from ldm.io.formats import save_original

    components, sd, sd1_yaml = tiny
    sd1 = tmp_path / "sd1.safetensors"
    write_safetensors(sd, sd1)
    folder, _ = save_diffusers_sdxl(tmp_path / "pipe")
    save_original(load_model(folder), tmp_path / "xl.safetensors")
    dst = tmp_path / "out"
    _fails(capsys, [str(tmp_path / "xl.safetensors"), str(dst), "--to", "native", "--config", str(sd1_yaml)], dst,
           "xl.safetensors is an SDXL checkpoint", "describes an SD-1/SD-2 model", "sd_xl_base.yaml")
    _fails(capsys, [str(sd1), str(dst), "--to", "native", "--config", str(tmp_path / "xl.yaml")], dst,
           "sd1.safetensors is an SD-1/SD-2 checkpoint", "xl.yaml describes an SDXL model", "leave --config out")

"""SDXL loads and converts between diffusers folders, Stability's single files (sgm layout) and the native format
(issue 14, sec. 2 and 5): round trips are bitwise, and an exported single file loads in diffusers."""
import json

import pytest
import torch
import yaml
from helpers import assert_close_to_ref, realistic_weights, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sdxl_helpers import save_diffusers_sdxl

from ldm.cli import convert
from ldm.diffusion.schedules import ScheduleConfig
from ldm.io.components import ModelParts, resolved_config
from ldm.io.formats import load_model, save
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.micro_conditioning import SDXL_BASE, SDXL_REFINER
from ldm.models.sdxl_text import SDXLTextConfig, build_sdxl_text_encoder
from ldm.models.unet import UNetConfig, UNetModel

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow


def tensors(path) -> dict:
    """Every tensor of a safetensors file, or of every safetensors file in a folder (keyed by relative path)."""
    if path.is_file():
        return load_file(str(path))
    out = {}
    for file in sorted(path.rglob("*.safetensors")):
        for key, value in load_file(str(file)).items():
            key = key.removeprefix("text_model.") if "text_encoder" in str(file) else key
            out[f"{file.parent.name}/{key}"] = value
    return out


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module", params=["base", "refiner"])
def folder(request, tmp_path_factory):
    return save_diffusers_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe", refiner=request.param == "refiner")


def test_diffusers_folder_round_trips_bitwise(folder, tmp_path):
    src, pipe = folder
    parts = load_model(src)
    refiner = pipe.text_encoder is None
    assert parts.unet.config.micro_conditioning == (SDXL_REFINER if refiner else SDXL_BASE)
    assert parts.text_encoder.force_zeros_for_empty_prompt is (not refiner)
    save(parts, tmp_path / "again", "diffusers")
    ours = {k: v for k, v in tensors(tmp_path / "again").items()}
    theirs = {k: v for k, v in tensors(src).items() if not k.endswith("position_ids")}
    assert_bitwise(ours, theirs)
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["_class_name"] == type(pipe).__name__
    assert index.get("requires_aesthetics_score", False) is refiner
    assert index["force_zeros_for_empty_prompt"] is (not refiner)
    again = load_model(tmp_path / "again")
    assert again.config == parts.config


def test_original_diffusers_native_original_bitwise(folder, tmp_path, capsys):
    src, pipe = folder
    first = tmp_path / "sd_xl.safetensors"
    code, err = run_cli(convert.main, [src, first, "--to", "original"], capsys)
    assert code == 0, err
    keys = load_file(str(first)).keys()
    text_prefix = "conditioner.embedders.0.model." if pipe.text_encoder is None else "conditioner.embedders.1.model."
    assert text_prefix + "text_projection" in keys and "model.diffusion_model.label_emb.0.0.weight" in keys
    sgm = yaml.safe_load(first.with_suffix(".yaml").read_text())
    emb = sgm["model"]["params"]["conditioner_config"]["params"]["emb_models"]
    assert [e["input_key"] for e in emb][-3:] == (["original_size_as_tuple", "crop_coords_top_left",
                                                    "aesthetic_score"] if pipe.text_encoder is None else
                                                   ["original_size_as_tuple", "crop_coords_top_left",
                                                    "target_size_as_tuple"])
    for src_path, dst, to in ((first, tmp_path / "d", "diffusers"), (tmp_path / "d", tmp_path / "n", "native"),
                              (tmp_path / "n", tmp_path / "last.safetensors", "original")):
        code, err = run_cli(convert.main, [src_path, dst, "--to", to], capsys)
        assert code == 0, err
    assert_bitwise(tensors(first), tensors(tmp_path / "last.safetensors"))
    assert yaml.safe_load((tmp_path / "last.yaml").read_text()) == sgm


def test_exported_single_file_loads_in_diffusers_from_single_file(tmp_path):
    # the two towers differ in width, as in the real SDXL (from_single_file tells them apart by it)
    for refiner in (False, True):
        src, pipe = save_diffusers_sdxl(tmp_path / f"pipe{refiner}", refiner=refiner, bigg_width=48)
        path = tmp_path / f"exported{refiner}.safetensors"
        save(load_model(src), path, "original")
        # offline, from_single_file needs the component configs: the diffusers folder gives them (config=)
        loaded = type(pipe).from_single_file(str(path), config=str(src), local_files_only=True)
        names = ["unet", "vae", "text_encoder_2"] + ([] if refiner else ["text_encoder"])
        for name in names:
            ours, theirs = getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict()
            assert ours.keys() == theirs.keys(), name
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
        prompt = ["a photo of a cat", ""]
        want = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        got = loaded.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        for a, b in zip(got, want):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def paper_convention_parts(refiner: bool = False) -> ModelParts:
    """A tiny SDXL whose head sizes follow the published convention (64-wide heads), so shapes alone describe it."""
    names = SDXL_REFINER if refiner else SDXL_BASE
    clip = None if refiner else dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                                     projection_dim=64)
    text_cfg = SDXLTextConfig(clip=clip, open_clip={"embed_dim": 64, "text_cfg": dict(
        context_length=77, vocab_size=49408, width=64, heads=1, layers=2, mlp_ratio=2.0), "quick_gelu": False},
        force_zeros_for_empty_prompt=not refiner)
    unet_cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=-1,
                          num_head_channels=32, transformer_depth=2, context_dim=64 if refiner else 128,
                          use_linear_in_transformer=True, adm_in_channels=64 + 8 * (5 if refiner else 6),
                          micro_conditioning=names, micro_conditioning_dim=8, sample_size=128)
    vae_cfg = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=256, scale_factor=0.13025)
    schedule = ScheduleConfig(steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading")
    unet, vae = realistic_weights(UNetModel(unet_cfg), 1), realistic_weights(AutoencoderKL(vae_cfg), 2)
    text = realistic_weights(build_sdxl_text_encoder(text_cfg), 3)
    return ModelParts(unet=unet, autoencoder=vae, text_encoder=text, schedule=schedule,
                      config=resolved_config(unet_cfg, vae_cfg, text_cfg, schedule))


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_layout_read_from_keys_or_sgm_yaml(tmp_path, refiner):
    parts = paper_convention_parts(refiner)
    path = tmp_path / "sd_xl.safetensors"
    save(parts, path, "original")
    with safe_open(str(path), "pt") as f:
        assert "ldm_config" in f.metadata()
    bare = tmp_path / "bare.safetensors"  # as Stability publishes it: no ldm config inside, no YAML beside
    save_file(load_file(str(path)), str(bare))
    inferred = load_model(bare)
    assert any("inferred from tensor shapes: SDXL" in n for n in inferred.notes)
    assert inferred.config["unet"] == parts.config["unet"]
    assert inferred.config["text_encoder"] == parts.config["text_encoder"]
    assert inferred.config["scheduler"] == parts.config["scheduler"]
    beside = tmp_path / "beside.safetensors"  # sd_xl_base.yaml beside the file
    save_file(load_file(str(path)), str(beside))
    beside.with_suffix(".yaml").write_text(path.with_suffix(".yaml").read_text())
    from_yaml = load_model(beside)
    assert any("beside.yaml" in n for n in from_yaml.notes)
    assert from_yaml.config["unet"] == parts.config["unet"]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    context = torch.randn(1, 77, parts.unet.config.context_dim)
    y, micro = torch.randn(1, 64), torch.tensor([[512.0, 512, 0, 0] + ([6.0] if refiner else [512.0, 512])])
    with torch.no_grad():
        want = parts.unet(x, t, context, y=y, micro=micro)
        for loaded in (inferred, from_yaml):
            state, source = loaded.unet.state_dict(), parts.unet.state_dict()
            assert state.keys() == source.keys() and all(torch.equal(state[k], source[k]) for k in source)
            # the same weights; loaded by assignment their memory layout may differ, so the sums may round apart
            assert_close_to_ref(loaded.unet(x, t, context, y=y, micro=micro), want)
            assert torch.equal(loaded.text_encoder.encode(["a cat"]).tokens, parts.text_encoder.encode(["a cat"]).tokens)


def test_logit_scale_of_a_published_file_is_dropped_with_a_note(tmp_path):
    parts = paper_convention_parts()
    path = tmp_path / "sd_xl.safetensors"
    save(parts, path, "original")
    sd = load_file(str(path))
    sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(tmp_path / "published.safetensors"))
    loaded = load_model(tmp_path / "published.safetensors")
    assert any("logit_scale" in n for n in loaded.notes)

"""load_model / save_* across original single files, diffusers folders and native folders; diffusers is the peer."""
import json

import pytest
import torch
from helpers import CLIP_HF, assert_close_to_ref, realistic_weights, tiny_components, unet_inputs

from ldm.errors import CheckpointError, ConfigError
from ldm.io.checkpoint import read_safetensors_metadata, read_state_dict
from ldm.io.formats import load_model, original_config, save_diffusers, save_native, save_original
from ldm.io.original_format import METADATA_KEY

diffusers = pytest.importorskip("diffusers")
PROMPTS = ["a red cube on a table", ""]


def _text_ids(encoder):
    if type(encoder).__name__ == "CLIPTextEncoder":
        return encoder.tokenizer(PROMPTS, padding="max_length", max_length=encoder.max_length, truncation=True,
                                 return_tensors="pt").input_ids
    return encoder.tokenizer(PROMPTS)


def _check_against_diffusers(ours, d_unet, d_vae, d_text, kind):
    """Same outputs for the U-Net, the autoencoder (encode and decode) and the text encoder."""
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        assert_close_to_ref(ours.unet(x, t, ctx), d_unet(x, t, encoder_hidden_states=ctx).sample, what="unet")
        img = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        assert_close_to_ref(ours.autoencoder.encode(img).mean, d_vae.encode(img).latent_dist.mean, what="encode")
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        assert_close_to_ref(ours.autoencoder.decode(z), d_vae.decode(z).sample, what="decode")
        if d_text is not None:
            ids = _text_ids(ours.text_encoder)
            assert_close_to_ref(ours.text_encoder.encode(PROMPTS).tokens, d_text(ids).last_hidden_state,
                                what="text")


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def exported(request, tmp_path_factory):
    """A tiny model written with save_original, and the components it came from."""
    kind = request.param
    components = tiny_components(kind)
    path = tmp_path_factory.mktemp(kind) / "model.safetensors"
    save_original(components, path)
    return kind, components, path


def test_original_export_loads_in_diffusers_single_file(exported):
    """Export check: diffusers' own single-file loader reads our original export into equal modules."""
    kind, ours, path = exported
    yaml_path = path.with_suffix(".yaml")
    assert yaml_path.is_file()
    d_unet = diffusers.UNet2DConditionModel.from_single_file(str(path), original_config=str(yaml_path),
                                                             local_files_only=True)
    d_vae = diffusers.AutoencoderKL.from_single_file(str(path), original_config=str(yaml_path), local_files_only=True)
    assert d_vae.config.scaling_factor == pytest.approx(0.18215)
    d_text = None
    if kind == "sd1":  # diffusers' SD-1 CLIP key map on the same file
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
        from transformers import CLIPTextConfig, CLIPTextModel

        d_text = CLIPTextModel(CLIPTextConfig(**CLIP_HF)).eval()
        sd = convert_ldm_clip_checkpoint(read_state_dict(path))
        missing, unexpected = d_text.load_state_dict({k.removeprefix("text_model."): v for k, v in sd.items()},
                                                     strict=False)
        assert not missing and not unexpected
    _check_against_diffusers(ours, d_unet.eval(), d_vae.eval(), d_text, kind)


def test_saved_diffusers_folder_loads_in_diffusers(exported, tmp_path):
    """save_diffusers writes configs diffusers reads: same outputs from diffusers' from_pretrained."""
    from transformers import CLIPTextModel

    kind, ours, _ = exported
    save_diffusers(ours, tmp_path / "pipe")
    d_unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "pipe", subfolder="unet").eval()
    d_vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae").eval()
    d_text = CLIPTextModel.from_pretrained(tmp_path / "pipe" / "text_encoder").eval()
    if kind == "sd2":  # the unused last OpenCLIP block is not part of diffusers' SD-2 text encoder
        assert d_text.config.num_hidden_layers == 2 and d_text.config.hidden_act == "gelu"
    _check_against_diffusers(ours, d_unet, d_vae, d_text, kind)
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert scheduler.config.prediction_type == ours.schedule.prediction_type
    assert scheduler.config.steps_offset == 1 and scheduler.config.set_alpha_to_one is False
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    assert pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_round_trip_original_diffusers_native_original(exported, tmp_path):
    """original -> diffusers -> native -> original: SD-1 bitwise; SD-2 up to the unused last text block."""
    kind, ours, path = exported
    a = load_model(path)
    save_diffusers(a, tmp_path / "diffusers")
    b = load_model(tmp_path / "diffusers")
    save_native(b, tmp_path / "native")
    c = load_model(tmp_path / "native")
    save_original(c, tmp_path / "back.safetensors")
    before, after = read_state_dict(path), read_state_dict(tmp_path / "back.safetensors")
    assert set(before) == set(after)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    if kind == "sd1":
        assert changed == []
    else:
        # diffusers' SD-2 text encoder drops block 2 (of 3), text_projection and logit_scale: they come back as an
        # identity block, an identity projection and open_clip's initial logit scale.
        last = "cond_stage_model.model.transformer.resblocks.2."
        assert changed and all(k.startswith(last) or k.endswith(("text_projection", "logit_scale")) for k in changed)
        assert torch.equal(after[last + "attn.out_proj.weight"], torch.zeros(32, 32))
        with torch.no_grad():
            t0 = ours.text_encoder.encode(PROMPTS).tokens
            assert torch.equal(c.text_encoder.encode(PROMPTS).tokens, t0)  # penultimate layer: unchanged
    assert c.config == b.config
    assert c.schedule == ours.schedule  # prediction type carried by the file's ldm metadata and scheduler config
    assert json.loads(read_safetensors_metadata(path)[METADATA_KEY]) == ours.config


def _write_diffusers_folder(root, kind):
    """A pipeline folder written by diffusers and transformers themselves (save_pretrained)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.tokenizers import clip_tokenizer

    sd2 = kind == "sd2"
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(1, 2) if sd2 else 8, use_linear_projection=sd2)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.13025)
    text = CLIPTextModel(CLIPTextConfig(**{**CLIP_HF, "hidden_act": "gelu" if sd2 else "quick_gelu"}))
    for i, m in enumerate((unet, vae, text)):
        realistic_weights(m, 10 + i).eval()
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    clip_tokenizer(pad_token="!" if sd2 else "<|endoftext|>").save_pretrained(root / "tokenizer")
    scheduler_cls = diffusers.DDIMScheduler if sd2 else diffusers.PNDMScheduler
    extra = {"prediction_type": "v_prediction", "set_alpha_to_one": False} if sd2 else {"skip_prk_steps": True}
    scheduler_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  **extra).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", scheduler_cls.__name__],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return unet, vae, text


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_loading_a_folder_written_by_diffusers(tmp_path, kind):
    d_unet, d_vae, d_text = _write_diffusers_folder(tmp_path, kind)
    ours = load_model(tmp_path)
    assert ours.text_encoder.__class__.__name__ == ("OpenCLIPTextEncoder" if kind == "sd2" else "CLIPTextEncoder")
    assert ours.autoencoder.config.scale_factor == pytest.approx(0.13025)
    expected_prediction = "v_prediction" if kind == "sd2" else "epsilon"
    assert ours.schedule.prediction_type == expected_prediction and ours.schedule.steps_offset == 1
    _check_against_diffusers(ours, d_unet, d_vae, d_text, kind)
    if kind == "sd1":  # the folder's own tokenizer is used
        assert ours.text_encoder.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_dtype_and_prediction_type_overrides(exported, tmp_path):
    kind, ours, path = exported
    half = load_model(path, dtype="fp16", prediction_type="v_prediction")
    assert half.unet.input_blocks[0][0].weight.dtype == torch.float16
    assert half.schedule.prediction_type == "v_prediction"
    assert half.config["scheduler"]["prediction_type"] == "v_prediction"
    save_original(half, tmp_path / "half.safetensors")
    again = load_model(tmp_path / "half.safetensors")  # dtype=None keeps the stored precision
    assert again.autoencoder.decoder.conv_out.weight.dtype == torch.float16
    assert torch.equal(again.unet.out[2].weight, ours.unet.out[2].weight.half())


def test_sibling_yaml_is_used_for_plain_files(exported, tmp_path):
    """A `name.yaml` beside a checkpoint without ldm metadata (web-UI convention) describes it."""
    kind, ours, path = exported
    from ldm.io.checkpoint import write_safetensors

    plain = tmp_path / "plain.safetensors"
    write_safetensors(read_state_dict(path), plain)  # no ldm metadata
    config = original_config(ours)
    config["model"]["params"]["parameterization"] = "v"
    from ldm.config import save_yaml

    save_yaml(config, plain.with_suffix(".yaml"))
    loaded = load_model(plain)
    assert loaded.schedule.prediction_type == "v_prediction"
    assert any("plain.yaml" in n for n in loaded.notes)


def test_config_only_for_single_files_and_unknown_folders(exported, tmp_path):
    kind, ours, path = exported
    save_native(ours, tmp_path / "native")
    with pytest.raises(ConfigError, match="single-file"):
        load_model(tmp_path / "native", config="configs/sd-v1-inference.yaml")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a diffusers pipeline"):
        load_model(tmp_path / "empty")


def test_offline_hub_id_fails_at_once_with_a_local_path_hint(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="pass the local folder"):
        load_model("someone-who/does-not-exist-sd")
    assert no_network == []  # offline means offline: no lookup, no connection, so no waiting on a timeout


def test_hub_ids_and_missing_local_paths_are_told_apart(tmp_path):
    from ldm.io.hub import _pick_files, looks_like_hub_id

    assert looks_like_hub_id("runwayml/stable-diffusion-v1-5")
    assert looks_like_hub_id("stabilityai/stable-diffusion-2-1/v2-1_768-ema-pruned.safetensors")
    assert not looks_like_hub_id("models/sd15.safetensors")  # a local file that is not there
    assert not looks_like_hub_id("./runwayml/stable-diffusion-v1-5")
    with pytest.raises(CheckpointError, match="not found: models/sd15.safetensors"):
        load_model("models/sd15.safetensors")
    files = ["model_index.json", "v1-5-pruned.ckpt", "unet/config.json", "unet/diffusion_pytorch_model.bin",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.bin", "text_encoder/config.json",
             "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json",
             "safety_checker/model.safetensors"]
    assert sorted(_pick_files(files)) == sorted([
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.bin", "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/vocab.json", "scheduler/scheduler_config.json"])


def test_fp16_variant_and_sharded_folders_as_diffusers_and_transformers_write_them(tmp_path):
    """save_pretrained(variant="fp16", max_shard_size=...) names its index `*.safetensors.index.fp16.json` (shards
    `*.fp16-00001-of-0000N.safetensors`); transformers' pickles are `pytorch_model*.bin`. All load, bitwise."""
    from transformers import CLIPTextModel

    plain = tmp_path / "plain"
    plain.mkdir()
    d_unet, d_vae, d_text = _write_diffusers_folder(plain, "sd1")
    variant = tmp_path / "variant"
    for sub in ("tokenizer", "scheduler"):
        (variant / sub).mkdir(parents=True)
        for f in (plain / sub).iterdir():
            (variant / sub / f.name).write_bytes(f.read_bytes())
    (variant / "model_index.json").write_text((plain / "model_index.json").read_text())
    d_unet.half().save_pretrained(variant / "unet", variant="fp16", max_shard_size="200KB")
    d_vae.half().save_pretrained(variant / "vae", variant="fp16")
    CLIPTextModel.from_pretrained(plain / "text_encoder").half().save_pretrained(
        variant / "text_encoder", max_shard_size="100KB", safe_serialization=True)
    assert (variant / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert (variant / "text_encoder" / "model.safetensors.index.json").is_file()
    ours, reference = load_model(variant), load_model(plain, dtype="fp16")
    for role in ("unet", "autoencoder", "text_encoder"):
        got, want = ours[role].state_dict(), reference[role].state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), role
    # transformers' pickle name, pytorch_model.bin (SD-1.x repositories ship it beside model.safetensors)
    before = load_model(plain).text_encoder.state_dict()
    torch.save(read_state_dict(plain / "text_encoder" / "model.safetensors"), plain / "text_encoder" / "pytorch_model.bin")
    (plain / "text_encoder" / "model.safetensors").unlink()
    after = load_model(plain).text_encoder.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    # a shard the index names but the folder lacks: the index and the shard named
    shard = next((variant / "unet").glob("*00002-of-*.safetensors"))
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names the shard {shard.name}"):
        load_model(variant)


def test_hub_downloads_what_sdxl_if_and_sharded_components_need():
    from ldm.io.hub import _pick_files

    files = ["model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors.index.fp16.json",
             "text_encoder/model.fp16-00001-of-00002.safetensors", "text_encoder/model.fp16-00002-of-00002.safetensors",
             "text_encoder/pytorch_model.bin.index.json", "text_encoder/pytorch_model-00001-of-00002.bin",
             "text_encoder/pytorch_model-00002-of-00002.bin", "text_encoder_2/config.json",
             "text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors", "tokenizer_2/vocab.json",
             "tokenizer/spiece.model", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.fp16.bin"]
    assert sorted(_pick_files(files)) == sorted([
        "model_index.json", "text_encoder/config.json", "text_encoder/pytorch_model.bin.index.json",
        "text_encoder/pytorch_model-00001-of-00002.bin", "text_encoder/pytorch_model-00002-of-00002.bin",
        "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer_2/vocab.json",
        "tokenizer/spiece.model", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"])
    only_fp16 = ["text_encoder/model.safetensors.index.fp16.json", "text_encoder/model.fp16-00001-of-00002.safetensors",
                 "text_encoder/model.fp16-00002-of-00002.safetensors"]
    assert sorted(_pick_files(only_fp16)) == sorted(only_fp16)


@pytest.mark.parametrize("prediction", ["edm", "flow"])
def test_prediction_type_override_is_a_network_prediction_checked_before_loading(tiny_sd_folder, tmp_path, prediction):
    """`load_model` / `load_pipeline(prediction_type=)` take what a network may predict (eps / v / x0): "edm" made an
    SD model an EDM one (EDM's c_noise fed to a network trained on timesteps: noise out, no error)."""
    from ldm.pipeline.load import load_pipeline

    with pytest.raises(ConfigError, match=rf"prediction_type=.*{prediction}.*epsilon, v_prediction, sample"):
        load_model(tmp_path / "no-such-model.safetensors", prediction_type=prediction)  # refused before the file
    with pytest.raises(ConfigError, match="epsilon, v_prediction, sample"):
        load_pipeline(tiny_sd_folder, device="cpu", prediction_type=prediction)
    assert load_model(tiny_sd_folder, prediction_type="v").schedule.prediction_type == "v_prediction"

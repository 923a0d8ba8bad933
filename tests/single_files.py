"""Tiny SD-1 / SD-2 checkpoints in the layouts users bring, for the tests that load them in ldm and in diffusers
(tests/test_checkpoint_layouts_parity.py, tests/test_sd2_prediction.py): diffusers folders sized by the published
conventions, written as original-layout single files by `ldm-convert --to original`, stripped as published files are.
The module fixtures `sd1`, `sd2_v` and `sd2_base` are imported by the test modules that use them."""
import json

import pytest
import torch
from helpers import SD15_SCHEDULER, SEED, realistic_weights
from safetensors.torch import load_file, save_file

from ldm.cli import convert
from ldm.models.tokenizers import clip_tokenizer

diffusers = pytest.importorskip("diffusers")


def published(path, yaml: bool = False):
    """Rewrite an ldm-written single file as published ones are: no ldm config in its header; the YAML beside it
    kept only if `yaml`."""
    save_file(load_file(str(path)), str(path))
    if not yaml:
        path.with_suffix(".yaml").unlink(missing_ok=True)
    return path


def to_original(folder, path):
    """`ldm-convert FOLDER PATH --to original`: the single file (and its YAML beside it) of a diffusers folder."""
    assert convert.main([str(folder), str(path), "--to", "original"]) == 0
    return path



def sd_folder(root, *, sd2: bool = False):
    """(folder, scheduler config) of a tiny SD-1 or SD-2 pipeline in diffusers' classes, sized by the published
    conventions so the shapes alone describe it (SD-1: 8 heads, 64-wide text heads)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, norm_num_groups=32,  # SD-1: 8 heads; SD-2: heads min(64, model_channels) wide
        **(dict(attention_head_dim=(1, 2), use_linear_projection=True) if sd2 else dict(attention_head_dim=8)))
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # SD-2: OpenCLIP's blocks less the last, gelu (diffusers' layout)
        hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, projection_dim=64, hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if sd2 else 1))
    for i, module in enumerate((unet, vae, text_encoder)):
        realistic_weights(module, i).eval()
    schedule = {**SD15_SCHEDULER, "_class_name": "DDIMScheduler"}
    if sd2:  # stabilityai/stable-diffusion-2-1's scheduler_config.json
        schedule.update(prediction_type="v_prediction", _diffusers_version="0.8.0")
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=clip_tokenizer(pad_token="!") if sd2 else clip_tokenizer(),  # SD-2 pads as open_clip
        scheduler=diffusers.DDIMScheduler.from_config(schedule), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    folder = root / ("sd2" if sd2 else "sd1")
    pipe.save_pretrained(folder)
    # as the published folders: no timestep_spacing, so each sampler's own default spacing applies
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule))
    return folder, schedule


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(folder, scheduler config, the original single file's state dict) of a tiny SD-1 model."""
    root = tmp_path_factory.mktemp("sd1")
    folder, schedule = sd_folder(root)
    return folder, schedule, load_file(str(to_original(folder, root / "sd1.safetensors")))


@pytest.fixture(scope="module")
def sd2_v(tmp_path_factory):
    """(folder, scheduler config, single file, its v2-inference-v.yaml-style YAML) of a tiny SD-2 v model."""
    root = tmp_path_factory.mktemp("sd2")
    folder, schedule = sd_folder(root, sd2=True)
    path = to_original(folder, root / "768-v-ema.safetensors")
    yaml = root / "v2-inference-v.yaml"
    path.with_suffix(".yaml").rename(yaml)
    published(path)
    return folder, schedule, path, yaml


def fit_output_to_noise(unet, context_dim: int) -> None:
    """Refit a diffusers U-Net's output convolution (least squares) so that at the last timestep it returns its input,
    as a trained eps model does: ldm's probe then reads a slope of ~0.7 (random weights read ~0, as a v model)."""
    conv, features = unet.conv_out, {}
    hook = conv.register_forward_hook(lambda module, inputs, output: features.update(x=inputs[0]))
    x = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        unet(x, 999, encoder_hidden_states=torch.zeros(64, 1, context_dim))
        hook.remove()
        columns = torch.nn.functional.unfold(features["x"], 3, padding=1).transpose(1, 2)  # b (h w) (c 3 3)
        a = torch.cat([columns.reshape(-1, columns.shape[2]), torch.ones(columns.shape[0] * columns.shape[1], 1)], 1)
        solution = torch.linalg.lstsq(a.double(), x.permute(0, 2, 3, 1).reshape(-1, 4).double()).solution.float()
        conv.weight.copy_(solution[:-1].T.reshape(conv.weight.shape))
        conv.bias.copy_(solution[-1])


@pytest.fixture(scope="module")
def sd2_base(tmp_path_factory):
    """(folder, eps scheduler config, bare single file) of a tiny SD-2-base-like model: SD-2 shapes, an output layer
    fitted to return the noise at the last timestep (eps-like), no YAML, no global_step."""
    root = tmp_path_factory.mktemp("sd2-base")
    folder, schedule = sd_folder(root, sd2=True)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    fit_output_to_noise(unet, unet.config.cross_attention_dim)
    unet.save_pretrained(folder / "unet")
    path = published(to_original(folder, root / "512-base-ema.safetensors"))
    return folder, {**schedule, "prediction_type": "epsilon"}, path

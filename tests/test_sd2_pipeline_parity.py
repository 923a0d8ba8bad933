"""An SD-2 style diffusers folder (OpenCLIP-style gelu text tower read as the penultimate layer, linear-projection
transformers with per-level heads, SD-2.1's v-prediction DDIM config) gives diffusers' own images: same tiny weights,
prompt, seed, sampler and steps, also with zero terminal SNR + guidance rescale and Karras sigmas in img2img."""
import json

import numpy as np
import pytest
import torch
from helpers import SEED, assert_same_image, diffusers_scheduler
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from ldm.models.text_encoders import OpenCLIPTextEncoder  # noqa: E402
from ldm.models.tokenizers import clip_tokenizer  # noqa: E402
from ldm.pipeline.load import load_pipeline  # noqa: E402

PROMPT, NEGATIVE = "a red circle on the left", "blurry"
# stabilityai/stable-diffusion-2-1's scheduler_config.json
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def init_image() -> Image.Image:
    """A smooth 32 px colour pattern."""
    y, x = np.mgrid[0:32, 0:32] / 31.0
    rgb = np.stack([0.5 + 0.5 * np.cos(5 * x), y, x * y], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """(folder, text-to-image pipeline, img2img pipeline) of a tiny SD-2 style model in diffusers' classes."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)  # diffusers' and transformers' own initialisation
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # diffusers' SD-2 layout: OpenCLIP's blocks less the last, gelu
        hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=0))
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(pad_token="!"),
        scheduler=diffusers.DDIMScheduler.from_config(SD21_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd2") / "pipe"
    pipe.save_pretrained(folder)
    for p in (pipe, img2img := diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)):
        p.set_progress_bar_config(disable=True)
    return folder, pipe, img2img


def with_scheduler(folder, reference, sampler: str, **config) -> dict:
    """The folder's scheduler_config.json set to SD-2.1's plus `config`, and the reference's scheduler built from it."""
    config = {**SD21_SCHEDULER, **config}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    reference.scheduler = diffusers_scheduler(sampler, config)
    return config


def compare(folder, reference, sampler: str, what: str, *, ours_kwargs=None, **kwargs):
    expected = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=5.0, height=32,
                         width=32, generator=torch.Generator().manual_seed(7), output_type="np", **kwargs).images[0]
    ours = load_pipeline(folder, device="cpu")
    assert isinstance(ours.text_encoder, OpenCLIPTextEncoder) and ours.text_encoder.layer == "penultimate"
    assert ours.schedule_config.prediction_type == "v_prediction"
    image = ours(PROMPT, NEGATIVE, sampler=sampler, steps=8, guidance=5.0, seed=7, height=32, width=32,
                 **(ours_kwargs or {}))[0]
    assert_same_image(image, expected, what)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_sd21_config_gives_diffusers_image(sd2, sampler):
    folder, pipe, _ = sd2
    with_scheduler(folder, pipe, sampler)
    compare(folder, pipe, sampler, f"SD-2.1 config, {sampler}")


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_zero_terminal_snr_with_guidance_rescale_gives_diffusers_image(sd2, sampler):
    folder, pipe, _ = sd2
    with_scheduler(folder, pipe, sampler, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    compare(folder, pipe, sampler, f"zero SNR + rescale 0.7, {sampler}", guidance_rescale=0.7,
            ours_kwargs={"guidance_rescale": 0.7})


def test_karras_img2img_at_strength_a_third_gives_diffusers_image(sd2):
    folder, _, img2img = sd2
    with_scheduler(folder, img2img, "dpmpp_2m", use_karras_sigmas=True)
    compare(folder, img2img, "dpmpp_2m", "img2img, Karras, strength 0.33", image=init_image(), strength=0.33,
            ours_kwargs={"init_image": init_image(), "strength": 0.33})

"""Same weights, prompt, seed, sampler and steps give diffusers' own image (issue 3, section 7)."""
import json

import numpy as np
import pytest
import torch
from helpers import SEED

diffusers = pytest.importorskip("diffusers")

from ldm.pipeline.load import load_pipeline  # noqa: E402
from ldm.models.tokenizers import clip_tokenizer  # noqa: E402

# SD-1.5's scheduler config, as shipped in its diffusers folder (no timestep_spacing key).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def tiny_components(in_channels: int = 4):
    torch.manual_seed(SEED)  # diffusers' and transformers' own initialisation: weights at a realistic scale
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=32,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )).eval()
    return unet.eval(), vae.eval(), text_encoder, clip_tokenizer()


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    unet, vae, text_encoder, tokenizer = tiny_components()
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return save_folder(pipe, tmp_path_factory), pipe


def save_folder(pipe, tmp_path_factory):
    """`pipe` saved as a diffusers folder with, like SD-1.5's official one, no timestep_spacing."""
    folder = tmp_path_factory.mktemp("tiny-sd") / "pipe"
    pipe.save_pretrained(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config.pop("timestep_spacing", None)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


SCHEDULERS = {
    "ddim": lambda c: diffusers.DDIMScheduler.from_config(c),
    "euler": lambda c: diffusers.EulerDiscreteScheduler.from_config(c),
    "dpmpp_2m": lambda c: diffusers.DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++"),
    "unipc": lambda c: diffusers.UniPCMultistepScheduler.from_config(c),
    "lms": lambda c: diffusers.LMSDiscreteScheduler.from_config(c),
}


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_same_image_as_diffusers(diffusers_folder, sampler):
    folder, reference = diffusers_folder
    reference.scheduler = SCHEDULERS[sampler](reference.scheduler.config)
    kwargs = dict(prompt="a red circle on the left", negative_prompt="blurry", num_inference_steps=8,
                  guidance_scale=5.0, height=32, width=32)
    expected = reference(**kwargs, generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]

    ours = load_pipeline(folder, device="cpu")
    image = ours("a red circle on the left", "blurry", sampler=sampler, steps=8, guidance=5.0, seed=7,
                 height=32, width=32)[0]
    got = np.asarray(image, dtype=np.float64) / 255.0
    expected = (expected * 255).round() / 255.0
    mad = np.abs(got - expected).mean()
    assert mad <= 1 / 255, f"{sampler}: mean |diff| {mad * 255:.3f}/255"
    # And the image is not trivially constant (the test would pass vacuously otherwise).
    assert got.std() > 0.01

"""The x4 upscaler loaded from a diffusers StableDiffusionUpscalePipeline folder makes diffusers' image for the same
seed (the low-res image noised on its own schedule, concatenated, its level as class label, v-prediction)."""
import json

import numpy as np
import pytest
import torch
from helpers import assert_same_image, diffusers_scheduler, noisy_image
from upscaler_helpers import tiny_diffusers_upscale_pipeline

from ldm.errors import LdmError
from ldm.pipeline.load import load_pipeline

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a red circle", "blurry"


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """(folder, reference pipeline): the tiny upscale pipeline saved as a diffusers folder."""
    reference = tiny_diffusers_upscale_pipeline()
    folder = tmp_path_factory.mktemp("x4") / "pipe"
    reference.save_pretrained(folder)
    return folder, reference


def _use_sampler(folder, reference, sampler):
    """diffusers' scheduler for `sampler` from the saved config, as a user loading the folder gets it (the in-memory
    config would leave the writer's defaults, timestep_spacing among them, to the new class)."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    reference.scheduler = diffusers_scheduler(sampler, config)


def _reference(reference, image, **kwargs):
    return reference(prompt=PROMPT, image=image, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(7),
                     output_type="np", **kwargs).images[0]


def test_the_folder_loads_as_a_latent_upscaler(upscaler):
    folder, _ = upscaler
    pipe = load_pipeline(folder, device="cpu")
    assert pipe.stage.latent_upscaler and pipe.codec.downsample_factor == 4
    assert pipe.stage.latent_upscale.max_noise_level == 350 and pipe.stage.latent_upscale.noise_level == 20
    assert pipe.stage.latent_upscale.beta_schedule == "scaled_linear"
    assert pipe.schedule_config.prediction_type == "v_prediction"
    assert pipe.unet.config.disable_self_attentions == (True, True, False)
    assert pipe.stage.default_settings == {"steps": 75, "guidance": 9.0}  # diffusers' upscale defaults


@pytest.mark.parametrize("sampler", ["ddim", pytest.param("euler", marks=pytest.mark.slow),
                                     pytest.param("ddpm", marks=pytest.mark.slow)])
def test_same_image_as_diffusers(upscaler, sampler):
    folder, reference = upscaler
    image = noisy_image(3, 16)
    _use_sampler(folder, reference, sampler)
    expected = _reference(reference, image, guidance_scale=6.0, noise_level=20, num_inference_steps=4)
    ours = load_pipeline(folder, device="cpu")
    got = ours(PROMPT, NEGATIVE, init_image=image, sampler=sampler, steps=4, guidance=6.0, seed=7, noise_level=20)[0]
    assert got.size == (64, 64)
    assert_same_image(got, expected, f"x4 upscaler, {sampler}")
    # the prompt and the noise level (a class label: the tiny U-Net has 100) move diffusers' own image far beyond the tolerance
    for kwargs in ({"noise_level": 90}, {"noise_level": 20, "prompt_override": "a blue square"}):
        prompt = kwargs.pop("prompt_override", PROMPT)
        other = reference(prompt=prompt, image=image, negative_prompt=NEGATIVE, guidance_scale=6.0,
                          num_inference_steps=4, generator=torch.Generator().manual_seed(7), output_type="np",
                          **kwargs).images[0]
        assert np.abs(other - expected).mean() > 3 / 255, kwargs


@pytest.mark.slow
def test_without_guidance_and_with_two_images_per_prompt(upscaler):
    folder, reference = upscaler
    image = noisy_image(5, 16)
    _use_sampler(folder, reference, "ddim")
    expected = reference(prompt=PROMPT, image=image, negative_prompt=NEGATIVE, guidance_scale=1.0, noise_level=60,
                         num_inference_steps=3, num_images_per_prompt=2, generator=torch.Generator().manual_seed(7),
                         output_type="np").images
    ours = load_pipeline(folder, device="cpu")
    got = ours(PROMPT, NEGATIVE, init_image=image, sampler="ddim", steps=3, guidance=1.0, seed=7, noise_level=60, n=2)
    assert len(got) == len(expected) == 2
    for i in range(2):
        assert_same_image(got[i], expected[i], f"image {i}")


def test_bad_requests_are_refused_with_the_way_out(upscaler):
    folder, _ = upscaler
    pipe = load_pipeline(folder, device="cpu")
    with pytest.raises(LdmError, match="--init-image"):
        pipe(PROMPT, steps=2)
    with pytest.raises(LdmError, match="0..350"):
        pipe(PROMPT, init_image=noisy_image(1, 16), steps=2, noise_level=351)
    with pytest.raises(LdmError, match="multiples of 4"):
        pipe(PROMPT, init_image=noisy_image(1, 18), steps=2)
    with pytest.raises(LdmError, match="--height"):
        pipe(PROMPT, init_image=noisy_image(1, 16), steps=2, height=64)


def test_in_float16_the_autoencoder_runs_in_float32(upscaler):
    folder, _ = upscaler
    half = load_pipeline(folder, device="cpu", dtype="fp16")
    full = load_pipeline(folder, device="cpu", dtype="fp32")
    assert next(half.unet.parameters()).dtype == torch.float16
    assert next(half.autoencoder.parameters()).dtype == torch.float32  # diffusers' force_upcast: fp16 overflows
    image = noisy_image(4, 16)
    kwargs = dict(init_image=image, sampler="ddim", steps=2, guidance=6.0, seed=3)
    a = np.asarray(half(PROMPT, NEGATIVE, **kwargs)[0], dtype=float)
    b = np.asarray(full(PROMPT, NEGATIVE, **kwargs)[0], dtype=float)
    assert np.abs(a - b).mean() < 2.0  # on the 0..255 scale: fp16 rounding in the U-Net only

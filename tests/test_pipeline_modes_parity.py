"""img2img and inpainting give diffusers' own images: same tiny weights, prompt, image, mask, seed, sampler, steps."""
import numpy as np
import pytest
import torch
from helpers import PIPELINE_SAMPLERS, assert_same_image, diffusers_scheduler, diffusers_sd_folder
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from ldm.pipeline.load import load_pipeline  # noqa: E402

PROMPT, NEGATIVE = "a red circle on the left", "blurry"


def init_image() -> Image.Image:
    """A smooth 32 px colour pattern (what an autoencoder sees in practice, not white noise)."""
    y, x = np.mgrid[0:32, 0:32] / 31.0
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def mask_image() -> Image.Image:
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:20, 8:28] = 255  # white = repaint
    return Image.fromarray(mask, mode="L")


@pytest.fixture(scope="module")
def img2img_folder(tmp_path_factory):
    return diffusers_sd_folder(tmp_path_factory, diffusers.StableDiffusionImg2ImgPipeline, in_channels=4)


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    return diffusers_sd_folder(tmp_path_factory, diffusers.StableDiffusionInpaintPipeline, in_channels=9)


def reference_image(reference, sampler: str, **kwargs) -> np.ndarray:
    """diffusers' image with `sampler`'s scheduler, 8 steps, guidance 5 and seed 7."""
    reference.scheduler = diffusers_scheduler(sampler, reference.scheduler.config)
    return reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=5.0,
                     generator=torch.Generator("cpu").manual_seed(7), output_type="np", **kwargs).images[0]


def skip_lms_started_part_way(sampler: str, strength: float) -> None:
    """diffusers' LMSDiscreteScheduler started part-way (begin_index > 0) takes its order from the global step index
    and zips order-4 coefficients with the one derivative it holds; ours starts at order 1, as LMS must."""
    if sampler == "lms" and strength < 1.0:
        pytest.skip("diffusers' LMS started part-way applies high-order coefficients to a one-derivative history")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", PIPELINE_SAMPLERS)
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_same_image_as_diffusers(img2img_folder, sampler, strength):
    skip_lms_started_part_way(sampler, strength)
    folder, reference = img2img_folder
    expected = reference_image(reference, sampler, image=init_image(), strength=strength)
    ours = load_pipeline(folder, device="cpu")
    image = ours(PROMPT, NEGATIVE, init_image=init_image(), strength=strength, sampler=sampler, steps=8, guidance=5.0,
                 seed=7, height=32, width=32)[0]
    assert_same_image(image, expected, f"img2img {sampler} strength {strength}")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", PIPELINE_SAMPLERS)
@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpainting_with_a_9_channel_unet_same_image_as_diffusers(inpaint_folder, sampler, strength):
    skip_lms_started_part_way(sampler, strength)
    folder, reference = inpaint_folder
    expected = reference_image(reference, sampler, image=init_image(), mask_image=mask_image(), strength=strength,
                               height=32, width=32)
    ours = load_pipeline(folder, device="cpu")
    assert ours.unet.config.in_channels == 9
    image = ours(PROMPT, NEGATIVE, init_image=init_image(), mask_image=mask_image(), strength=strength,
                 sampler=sampler, steps=8, guidance=5.0, seed=7, height=32, width=32)[0]
    assert_same_image(image, expected, f"inpainting {sampler} strength {strength}")

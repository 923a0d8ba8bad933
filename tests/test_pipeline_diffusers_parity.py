"""Same weights, prompt, seed, sampler and steps give diffusers' own image (issue 3, section 7)."""
import pytest
import torch
from helpers import PIPELINE_SAMPLERS, assert_same_image, diffusers_scheduler, diffusers_sd_folder

diffusers = pytest.importorskip("diffusers")

from ldm.pipeline.load import load_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    return diffusers_sd_folder(tmp_path_factory, diffusers.StableDiffusionPipeline)


@pytest.mark.parametrize("sampler", PIPELINE_SAMPLERS)
def test_same_image_as_diffusers(diffusers_folder, sampler):
    folder, reference = diffusers_folder
    reference.scheduler = diffusers_scheduler(sampler, reference.scheduler.config)
    kwargs = dict(prompt="a red circle on the left", negative_prompt="blurry", num_inference_steps=8,
                  guidance_scale=5.0, height=32, width=32)
    expected = reference(**kwargs, generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]

    ours = load_pipeline(folder, device="cpu")
    image = ours("a red circle on the left", "blurry", sampler=sampler, steps=8, guidance=5.0, seed=7,
                 height=32, width=32)[0]
    assert_same_image(image, expected, sampler)

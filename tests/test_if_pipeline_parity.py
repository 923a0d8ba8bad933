"""Whole DeepFloyd IF images on tiny random weights: ldm equals diffusers' IFPipeline (DDPM and DDIM) and
IFSuperResolutionPipeline within 1/255, loading the very folders diffusers saved."""
import numpy as np
import pytest
import torch
from helpers import assert_same_image
from if_helpers import if_pipeline
from PIL import Image

from ldm.diffusion.noise_augmentation import level_from_if_noise_level
from ldm.pipeline.images import to_pil
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.sampling import sample
from ldm.pipeline.settings import GenerationSettings
from ldm.pipeline.super_resolution import SuperResolution

PROMPT = "A photo of a Cat "  # diffusers lower-cases and strips it (clean_caption=False: no bs4/ftfy cleaning)
STEPS = 10  # IF's own defaults are 100 / 50; ten keep the CPU test short, the code path is the same


def _reference(pipe, prompt=PROMPT, **kwargs) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np",
               clean_caption=False, **kwargs)
    return out.images[0]


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    return if_pipeline(tmp_path_factory.mktemp("if1"), False, sample_size=16)


@pytest.mark.slow
def test_if_stage_one_ddpm_matches_diffusers(stage_one):
    """IFPipeline's own scheduler: DDPM, learned-range variance, dynamic thresholding at 0.95 capped at 1.5."""
    pipe, folder = stage_one
    expected = _reference(pipe, guidance_scale=7.0)
    ours = load_pipeline(folder)
    image = ours(PROMPT, seed=0, steps=STEPS, guidance=7.0, sampler="ddpm")[0]
    assert_same_image(image, expected, "IF-I DDPM")
    other = _reference(pipe, "an astronaut riding a horse", guidance_scale=7.0)
    assert np.abs(other - expected).mean() > 10 / 255  # the prompt moves the image far more than the tolerance


@pytest.mark.slow
def test_if_stage_one_ddim_matches_diffusers(stage_one):
    """DDIM on IF: diffusers needs variance_type fixed_small to drop the variance half (ECOSYSTEM.md).

    ldm's thresholding wraps the denoiser, so DDIM steps along the eps of the thresholded x0: diffusers' DDIM with
    `use_clipped_model_output=True` (its default steps along the raw eps; docs/deepfloyd-if.md).
    """
    import functools

    import diffusers

    pipe, folder = stage_one
    pipe.scheduler = diffusers.DDIMScheduler.from_config({**pipe.scheduler.config, "variance_type": "fixed_small"})
    assert pipe.scheduler.config.variance_type == "fixed_small" and pipe.scheduler.config.thresholding
    pipe.scheduler.step = functools.partial(pipe.scheduler.step, use_clipped_model_output=True)
    expected = _reference(pipe, guidance_scale=7.0)
    image = load_pipeline(folder)(PROMPT, seed=0, steps=STEPS, guidance=7.0, sampler="ddim")[0]
    assert_same_image(image, expected, "IF-I DDIM")


@pytest.mark.slow
def test_if_stage_two_matches_diffusers(tmp_path):
    """IFSuperResolutionPipeline at noise_level 250: bilinear (align_corners) upsampling, the low-res image noised on
    the cosine schedule, the level as class label; ldm's SuperResolution start at IF's level gives the same image."""
    pipe, folder = if_pipeline(tmp_path, True, sample_size=32)
    low = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    expected = _reference(pipe, image=low, guidance_scale=4.0, noise_level=250)
    ours = load_pipeline(folder)
    stage = ours.stage
    level = stage.stage_config.aug_level
    assert level == pytest.approx(float(level_from_if_noise_level(250)))
    low_res = torch.from_numpy(np.asarray(low, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    strategy = SuperResolution(low_res, level, stage.stage_config.resize_mode)
    settings = GenerationSettings(sampler="ddpm", steps=STEPS, guidance=4.0, seed=0, height=32, width=32)
    image = to_pil(sample(stage, [PROMPT], settings, strategy=strategy))[0]
    assert_same_image(image, expected, "IF-II DDPM")
    quieter = _reference(pipe, image=low, guidance_scale=4.0, noise_level=20)
    assert np.abs(quieter - expected).mean() > 2 / 255  # the noise level reaches the network

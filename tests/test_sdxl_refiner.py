"""SDXL's refiner (issue 14, sec. 3 and 5): the base + refiner ensemble at denoising_end = denoising_start = 0.8
equals diffusers' two pipelines chained on latents, and the refiner as img2img on a finished image equals
StableDiffusionXLImg2ImgPipeline."""
import numpy as np
import pytest
import torch
from helpers import assert_same_image, diffusers_scheduler
from PIL import Image
from sdxl_helpers import save_diffusers_sdxl, scheduler_config

from ldm.diffusion.plans import sampling_plan
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import LdmError
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.refiner import ExpertEnsemble, split_step

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle on the left"
STEPS = 10  # leading spacing: timesteps 901, 801, ..., 1; at 0.8 the base runs 901..201 (8), the refiner 101, 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    base, base_pipe = save_diffusers_sdxl(root / "base")
    refiner, refiner_pipe = save_diffusers_sdxl(root / "refiner", refiner=True, seed=10)
    return base, base_pipe, refiner, refiner_pipe


def test_split_follows_denoising_end():
    schedule = ScheduleConfig(steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading")
    plan = sampling_plan(schedule, "euler", STEPS)
    assert plan.timesteps.tolist()[:3] == [901, 801, 701]
    assert split_step(plan, 0.8) == 8 and split_step(plan, 0.5) == 5 and split_step(plan, 0.95) == 9


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_ensemble_equals_diffusers_base_then_refiner(models, sampler):
    base, base_pipe, refiner, refiner_pipe = models
    for folder, pipe in ((base, base_pipe), (refiner, refiner_pipe)):
        pipe.scheduler = diffusers_scheduler(sampler, scheduler_config(folder))
    common = dict(num_inference_steps=STEPS, guidance_scale=5.0)
    latents = base_pipe(PROMPT, height=64, width=64, denoising_end=0.8, output_type="latent",
                        generator=torch.Generator().manual_seed(7), **common).images
    expected = refiner_pipe(PROMPT, image=latents, denoising_start=0.8, output_type="np",
                            generator=torch.Generator().manual_seed(7), **common).images[0]
    ensemble = ExpertEnsemble(load_pipeline(base), load_pipeline(refiner), high_noise_frac=0.8)
    image = ensemble(PROMPT, sampler=sampler, steps=STEPS, guidance=5.0, seed=7, height=64, width=64)[0]
    assert_same_image(image, expected, f"ensemble, {sampler}")
    alone = load_pipeline(base)(PROMPT, sampler=sampler, steps=STEPS, guidance=5.0, seed=7, height=64, width=64)[0]
    assert np.abs(np.asarray(alone, float) - np.asarray(image, float)).mean() > 1.0  # the refiner did something


@pytest.mark.slow
def test_refiner_img2img_equals_diffusers(models):
    _, _, refiner, refiner_pipe = models
    refiner_pipe.scheduler = diffusers_scheduler("euler", scheduler_config(refiner))
    rng = np.random.default_rng(0)
    start = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    expected = refiner_pipe(PROMPT, image=start, strength=0.5, num_inference_steps=STEPS, guidance_scale=5.0,
                            generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    image = load_pipeline(refiner)(PROMPT, init_image=start, strength=0.5, sampler="euler", steps=STEPS,
                                   guidance=5.0, seed=3, height=64, width=64)[0]
    assert_same_image(image, expected, "refiner img2img")


def test_ensemble_refuses_what_it_cannot_do(models):
    base, _, refiner, _ = models
    ensemble = ExpertEnsemble(load_pipeline(base), load_pipeline(refiner))
    with pytest.raises(LdmError, match="each model needs one"):
        ensemble.settings(steps=1)
    with pytest.raises(LdmError, match="--init-image"):
        ensemble.settings(from_image=True)
    with pytest.raises(LdmError, match="high-noise-frac"):
        ExpertEnsemble(load_pipeline(base), load_pipeline(refiner), high_noise_frac=1.0)

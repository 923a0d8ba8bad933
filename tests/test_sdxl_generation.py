"""SDXL images equal diffusers' StableDiffusionXLPipeline for the same weights, prompt and seed (issue 14, sec. 3):
ddim, euler and dpmpp_2m, with and without a negative prompt (without one, its embeddings are zeros), with the
micro-conditioning at its defaults or given."""
import numpy as np
import pytest
import torch
from helpers import assert_same_image, diffusers_scheduler
from sdxl_helpers import save_diffusers_sdxl, scheduler_config

from ldm.errors import LdmError
from ldm.pipeline.load import load_pipeline

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder, pipe = save_diffusers_sdxl(tmp_path_factory.mktemp("sdxl") / "base")
    return folder, pipe, load_pipeline(folder, device="cpu")


def reference(folder, pipe, sampler, **kwargs):
    pipe.scheduler = diffusers_scheduler(sampler, scheduler_config(folder))
    return pipe(PROMPT, num_inference_steps=8, guidance_scale=5.0, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(7), output_type="np", **kwargs).images[0]


@pytest.mark.parametrize("negative", [None, "blurry"], ids=["zeroed-negative", "negative"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_same_image_as_diffusers(base, sampler, negative):
    folder, pipe, ours = base
    expected = reference(folder, pipe, sampler, negative_prompt=negative)
    image = ours(PROMPT, negative, sampler=sampler, steps=8, guidance=5.0, seed=7, height=64, width=64)[0]
    assert_same_image(image, expected, f"{sampler}, negative {negative!r}")


def test_micro_conditioning_given_matches_diffusers_and_changes_the_image(base):
    folder, pipe, ours = base
    sizes = dict(original_size=(512, 384), crops_coords_top_left=(32, 16), target_size=(128, 96))
    expected = reference(folder, pipe, "euler", **sizes)
    image = ours(PROMPT, sampler="euler", steps=8, guidance=5.0, seed=7, height=64, width=64,
                 micro_conditioning=sizes)[0]
    assert_same_image(image, expected, "micro-conditioning given")
    default = np.asarray(ours(PROMPT, sampler="euler", steps=8, guidance=5.0, seed=7, height=64, width=64)[0], float)
    assert np.abs(default - np.asarray(image, float)).mean() > 1.0  # the numbers reach the image


def test_defaults_are_diffusers(base):
    _, pipe, ours = base
    assert ours.default_size == pipe.default_sample_size * pipe.vae_scale_factor  # SDXL proper: 128 x 8 = 1024
    assert ours.text_encoder.force_zeros_for_empty_prompt
    cond = ours.stage.conditioning([PROMPT], [None], 1, 5.0)
    assert not cond["uncond"]["context"].any() and not cond["uncond"]["y"].any()
    assert cond["cond"]["context"].abs().sum() > 0
    given = ours.stage.conditioning([PROMPT], [""], 1, 5.0)  # an explicit "" is encoded, as diffusers does
    assert given["uncond"]["context"].abs().sum() > 0
    with_sizes = ours.stage.micro_conditioning(cond, (1, 4, 8, 16))
    assert with_sizes["cond"]["micro"].tolist() == [[16.0, 32.0, 0.0, 0.0, 16.0, 32.0]]  # the tiny VAE: factor 2


def test_bad_micro_conditioning_is_refused(base):
    _, _, ours = base
    with pytest.raises(LdmError, match="original_size takes 2"):
        ours(PROMPT, steps=1, height=64, width=64, micro_conditioning={"original_size": (1,)})
    with pytest.raises(LdmError, match="unknown micro-conditioning"):
        ours(PROMPT, steps=1, height=64, width=64, micro_conditioning={"orignal_size": (1, 1)})


def test_force_upcast_keeps_the_vae_in_float32_under_fp16(base):
    folder, _, ours = base
    assert ours.autoencoder.config.force_upcast
    half = load_pipeline(folder, device="cpu", dtype="fp16")
    assert next(half.autoencoder.parameters()).dtype == torch.float32
    assert next(half.unet.parameters()).dtype == torch.float16
    z = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    out = half.codec.decode(z)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()  # decoded in float32, handed back in fp16


def test_img2img_strength_defaults_to_diffusers_sdxl_value(base):
    _, _, ours = base
    assert ours.settings(from_image=True).strength == 0.3  # StableDiffusionXLImg2ImgPipeline's default
    assert ours.settings(from_image=True, strength=0.6).strength == 0.6
    assert ours.settings(from_image=True, inpainting=True).strength == 1.0

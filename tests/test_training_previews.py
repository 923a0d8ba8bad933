"""Training previews are the pipeline's images: one sampling function serves both (every sampler, DDIM linspace too)."""
import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN_MODEL

from ldm.config import from_dict
from ldm.diffusion.plans import sampling_plan
from ldm.diffusion.sampler_registry import SAMPLERS
from ldm.io.native_format import export_native
from ldm.pipeline.load import load_pipeline
from ldm.train.config import ModelConfig, SamplingConfig
from ldm.train.model import build_parts
from ldm.train.samples import sample_images

PROMPT = "a red circle"


def tiny_parts(spacing: str | None):
    """Tiny training parts whose zero-initialised output layers are woken up (else every U-Net output is 0)."""
    torch.manual_seed(0)
    schedule = {"timestep_spacing": spacing} if spacing else {}
    parts = build_parts(from_dict(ModelConfig, {**TINY_TRAIN_MODEL, "random_autoencoder": True, "schedule": schedule}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in parts.unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return parts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """spacing -> (training parts, the pipeline of their exported model), built once per spacing."""
    cache = {}

    def get(spacing):
        if spacing not in cache:
            parts = tiny_parts(spacing)
            run = tmp_path_factory.mktemp("run")
            export_native(parts.model_parts(), run, step=1)
            cache[spacing] = parts, load_pipeline(run, device="cpu", dtype="fp32")
        return cache[spacing]

    return get


# Every sampler at its diffusers default spacing, and DDIM with linspace: the case the old preview code got wrong
# (DDIM then steps to sigmas that are not the next evaluated ones: the plan's sigmas_next, which it dropped).
CASES = [(sampler, None) for sampler in SAMPLERS] + [("ddim", "linspace")]


@pytest.mark.slow
@pytest.mark.parametrize("sampler, spacing", CASES, ids=[f"{s}-{p or 'default'}" for s, p in CASES])
def test_a_training_preview_is_the_image_ldm_txt2img_makes(trained, sampler, spacing):
    parts, pipe = trained(spacing)
    if spacing == "linspace":
        assert "sigmas_next" in sampling_plan(parts.schedule, "ddim", 6).sampler_kwargs
    config = SamplingConfig(sampler=sampler, steps=6, guidance=3.0, seed=11)
    preview = sample_images(parts, [PROMPT], config, latent_size=8, device=torch.device("cpu"))[0]
    assert parts.unet.training  # the preview put the U-Net back in training mode
    image = pipe(PROMPT, sampler=sampler, steps=6, guidance=3.0, seed=11, height=16, width=16)[0]
    a, b = np.asarray(preview), np.asarray(image)
    assert a.shape == (16, 16, 3) and a.std() > 1.0  # a real image, not a constant
    assert np.array_equal(a, b), f"{sampler}: max |diff| {np.abs(a.astype(int) - b.astype(int)).max()}"

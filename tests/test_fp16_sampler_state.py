"""Half-precision stages sample with a float32 x: x = noise * sigma_max overflows float16 on the cosine schedule.

sigma_max of the cosine (squaredcos_cap_v2) schedule is 20291, so every |noise| > 65504 / 20291 = 3.2 was inf in the
stage's float16, and the first network call turned the image to NaN (the bundled upscaler's NaN images on the GPU).
The network still runs in float16: only c_in x, about unit variance, is cast to it.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from if_helpers import if_pipeline

from ldm.config import from_dict, load_yaml
from ldm.diffusion.denoiser import build_denoiser
from ldm.diffusion.noise_augmentation import StageConfig
from ldm.diffusion.plans import sampling_plan
from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig
from ldm.models.codecs import IdentityCodec
from ldm.models.efficient_unet import EfficientUNet, EfficientUNetConfig
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.sampling import sample
from ldm.pipeline.settings import GenerationSettings
from ldm.pipeline.stage import Stage
from ldm.pipeline.strategies import TextToImage
from ldm.pipeline.super_resolution import SuperResolution

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COSINE_V = ScheduleConfig(beta_schedule="cosine", prediction_type="v_prediction")  # configs/imagen-sr-emoji.yaml's
CONTEXT_DIM = 16
SR = {"in_channels": 6, "out_channels": 3, "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": (1, 1),
      "attention_levels": (1,), "cross_attention_levels": (1,), "num_head_channels": 32, "context_dim": CONTEXT_DIM,
      "text_pooling": "mean", "aug_level_conditioning": True, "downsample_first_level": True}


def _realistic(net: EfficientUNet) -> EfficientUNet:
    """The network with its zero-initialised output layers given realistic weights (zeros would hide NaN)."""
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, p[0].numel() ** -0.5)  # std 1/sqrt(fan_in), the scale of the default init
    return net.eval()


def _network(**overrides) -> EfficientUNet:
    """A tiny Efficient U-Net SR stage's network."""
    torch.manual_seed(0)
    return _realistic(EfficientUNet(EfficientUNetConfig(**{**SR, **overrides})))


def _text(dtype: torch.dtype, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    context = torch.randn(batch, 5, CONTEXT_DIM, generator=g).to(dtype)
    return {"context": context, "context_mask": torch.ones(batch, 5, dtype=torch.bool)}


def test_cosine_sigma_max_times_noise_overflows_float16():
    sigma_max = DiscreteSchedule.from_config(COSINE_V).sigma_max
    assert 16384 < sigma_max < 65504  # representable itself, but 4 sigma_max is not
    assert torch.isinf(torch.tensor([3.5], dtype=torch.float16) * sigma_max).all()


@pytest.mark.parametrize("dtype, state", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_the_sampler_state_is_at_least_float32_and_the_network_runs_in_the_stage_dtype(dtype, state):
    stage = Stage(_network(in_channels=3), COSINE_V, IdentityCodec(), dtype=dtype)
    assert stage.sample_dtype == state and next(stage.unet.parameters()).dtype == dtype
    seen = []
    stage.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    plan = sampling_plan(COSINE_V, "dpmpp_2m", 2)
    start = TextToImage().start(stage, (2, 3, 32, 32), plan, {}, stage.denoiser, torch.Generator().manual_seed(0))
    assert start.x.dtype == state and torch.isfinite(start.x).all()
    x0 = stage.denoiser(start.x, plan.sigmas[0], {**_text(dtype), "aug_level": torch.zeros(2)})
    assert seen == [dtype] and x0.dtype == state and torch.isfinite(x0).all()


def _upscale(dtype: torch.dtype, sampler: str, steps: int = 4) -> torch.Tensor:
    stage = Stage(_network(), COSINE_V, IdentityCodec(), dtype=dtype)
    low = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # 2 x 3 x 32 x 32 initial noise values: 12 of this seed's are beyond 3.2, inf in float16 before the fix
    settings = GenerationSettings(sampler=sampler, steps=steps, guidance=1.0, seed=0, height=32, width=32,
                                  dynamic_threshold=0)
    return sample(stage, ["", ""], settings, cond=_text(dtype), strategy=SuperResolution(low, 0.1)).float()


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_a_cosine_v_prediction_sr_stage_in_float16_samples_what_float32_does(sampler):
    ref = _upscale(torch.float32, sampler)
    half = _upscale(torch.float16, sampler)
    assert torch.isfinite(half).all()
    # rounding in the network only (a float32 x throughout): float16 gives the same images to 0.2% of their range
    # (bfloat16, 3 fewer mantissa bits, to 1.2%)
    assert (half - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-3
    brain = _upscale(torch.bfloat16, sampler)
    assert torch.isfinite(brain).all() and (brain - ref).abs().max() <= 8e-2 * ref.abs().max() + 1e-3


def test_float32_sampling_is_bitwise_what_it_was():
    """A float32 stage's denoiser casts nothing: the same x0 as the bare denoiser without a network dtype."""
    stage = Stage(_network(), COSINE_V, IdentityCodec(), dtype=torch.float32)
    bare = build_denoiser(stage.network, COSINE_V)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 32, 32, generator=g) * 20.0
    cond = {**_text(torch.float32), "concat": torch.randn(2, 3, 32, 32, generator=g), "aug_level": torch.zeros(2)}
    assert torch.equal(stage.denoiser(x, torch.tensor(20.0), cond), bare(x, torch.tensor(20.0), cond))


def _pixels(images) -> torch.Tensor:
    return torch.tensor(np.stack([np.asarray(image, dtype=np.float32) for image in images]))


@pytest.mark.slow
def test_deepfloyd_if_stage_samples_in_float16_what_it_does_in_float32(tmp_path):
    """IF's learned-variance ddpm with a float32 x and a float16 network. (IF's "leading" timestep spacing starts
    below t = 999, at sigma 71 for 100 steps, so its sigmas never overflowed float16; this guards the new path.)"""
    folder = if_pipeline(tmp_path, False, sample_size=8)[1]
    args = dict(seed=0, steps=4, guidance=1.0, sampler="ddpm", n=2)
    ref = _pixels(load_pipeline(folder, device="cpu", dtype="fp32")("a cat", **args))
    half = _pixels(load_pipeline(folder, device="cpu", dtype="fp16")("a cat", **args))
    assert (half - ref).abs().mean() < 0.5  # on the 0..255 scale: fp16 rounding in the U-Net only (0.11)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["imagen-tiny-base.yaml", "imagen-tiny-sr.yaml"])
def test_the_tiny_imagen_configs_sample_in_float16(name):
    model = load_yaml(CONFIGS / name)["model"]
    unet = {k: v for k, v in model["unet"].items() if k != "type"}
    schedule = from_dict(ScheduleConfig, model["schedule"], where="schedule")
    stage_config = from_dict(StageConfig, model["stage"], where="stage")
    size, batch = stage_config.resolution, 4  # 4 x 3 x 16 x 16 noise values: about 5 beyond 3.2
    images = {}
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        net = from_dict(EfficientUNetConfig, unet, where="unet")
        stage = Stage(_realistic(EfficientUNet(net)), schedule, IdentityCodec(), dtype=dtype,
                      stage_config=stage_config)
        cond = {"context": torch.randn(batch, 4, net.context_dim, generator=torch.Generator().manual_seed(3))
                .to(dtype), "context_mask": torch.ones(batch, 4, dtype=torch.bool)}
        strategy = None
        if stage.super_resolution:
            low = torch.rand(1, 3, stage_config.low_res_size, stage_config.low_res_size,
                             generator=torch.Generator().manual_seed(1)) * 2 - 1
            strategy = SuperResolution(low, stage_config.aug_level)
        settings = GenerationSettings(steps=3, guidance=1.0, seed=0, height=size, width=size)
        images[dtype] = sample(stage, [""] * batch, settings, cond=cond, strategy=strategy).float()
    ref, half = images[torch.float32], images[torch.float16]
    assert torch.isfinite(half).all() and (half - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-3

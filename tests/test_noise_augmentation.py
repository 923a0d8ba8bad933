import math

import pytest
import torch

from ldm.config import from_dict
from ldm.diffusion.noise_augmentation import (
    StageConfig,
    aug_alpha_sigma,
    augment,
    conditioning_image,
    downsample,
    level_from_if_noise_level,
    level_from_imagen_pytorch,
    low_res_condition,
    sample_aug_levels,
    training_conditioning_image,
    upsample,
)
from ldm.errors import ConfigError, LdmError


def _images(seed=0, shape=(3, 3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1, torch.randn(shape, generator=g)


def test_level_zero_is_exactly_the_identity():
    image, noise = _images()
    assert torch.equal(augment(image, 0.0, noise), image)
    assert torch.equal(augment(image, torch.zeros(3), noise), image)
    assert torch.equal(augment(image.half(), 0.0, noise.half()), image.half())
    alpha, sigma = aug_alpha_sigma(0.0)
    assert alpha.item() == 1.0 and sigma.item() == 0.0


def test_per_sample_levels_and_level_one_is_noise():
    image, noise = _images()
    out = augment(image, torch.tensor([0.0, 0.5, 1.0]), noise)
    assert torch.equal(out[0], image[0])
    half = math.sqrt(0.5)
    assert (out[1] - (half * image[1] + half * noise[1])).abs().max() <= 1e-6
    assert (out[2] - noise[2]).abs().max() <= 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level", [0.1, 0.37, 0.8])
def test_variance_preserving_monte_carlo(seed, level):
    # unit-variance data independent of the noise keeps unit variance; its correlation with the data is alpha
    g = torch.Generator().manual_seed(seed)
    n = 400_000
    data, noise = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    out = augment(data, level, noise)
    alpha = math.cos(math.pi / 2 * level)
    # std of a variance / covariance estimate over n samples is ~sqrt(2/n) = 0.0022: 0.02 is 9 of them
    assert abs(out.var().item() - 1.0) < 0.02
    assert abs((out * data).mean().item() - alpha) < 0.02
    a, s = aug_alpha_sigma(torch.tensor(level))
    assert abs((a**2 + s**2).item() - 1.0) < 1e-12


def test_out_of_range_level_is_an_error():
    image, noise = _images()
    for level in (-0.1, 1.5, torch.tensor([0.2, 1.01, 0.3])):
        with pytest.raises(LdmError, match="outside \\[0, 1\\]"):
            augment(image, level, noise)


def test_training_and_sampling_conditioning_identical():
    image, noise = _images()
    levels = sample_aug_levels(3, generator=torch.Generator().manual_seed(3))
    trained = training_conditioning_image(image, 16, levels, noise)
    previous_stage_output = downsample(image, 16)  # what the stage before this one would have produced
    sampled = conditioning_image(previous_stage_output, 32, levels, noise)
    assert torch.equal(trained, sampled)
    assert torch.equal(low_res_condition(image, 16), conditioning_image(previous_stage_output, 32, 0.0, noise))
    # a fixed sampling level as a float is the same as that level per sample
    fixed = conditioning_image(previous_stage_output, 32, 0.3, noise)
    assert torch.equal(fixed, conditioning_image(previous_stage_output, 32, torch.full((3,), 0.3, dtype=torch.float64), noise))


def test_downsample_is_antialiased_and_resizes_keep_constants():
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 2 - 1).float().expand(1, 3, 32, 32)
    # the Nyquist-frequency pattern averages out instead of aliasing into a +-1 pattern
    assert downsample(checker, 16).abs().max() < 0.05
    constant = torch.full((2, 3, 32, 32), 0.4)
    assert (low_res_condition(constant, 8) - 0.4).abs().max() < 1e-6
    assert low_res_condition(constant, 8).shape == (2, 3, 32, 32)
    assert upsample(torch.ones(1, 3, 4, 4) * 0.999, 16).max() <= 1.0  # clamped to the data range
    assert low_res_condition(constant, (8, 4), (16, 8)).shape == (2, 3, 16, 8)


def test_aug_level_sampler_range_and_reproducibility():
    levels = sample_aug_levels(10_000, 0.5, generator=torch.Generator().manual_seed(0))
    assert levels.shape == (10_000,) and levels.min() >= 0 and levels.max() <= 0.5
    assert abs(levels.mean().item() - 0.25) < 0.01  # uniform: mean max/2, std of the mean 0.0014
    again = sample_aug_levels(10_000, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(levels, again)


@pytest.mark.parametrize("noise_level", [250, 100, 20, 0, 999])
def test_if_noise_level_matches_diffusers_add_noise(noise_level):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    image, noise = _images(seed=noise_level)
    timesteps = torch.full((3,), noise_level, dtype=torch.long)
    expected = scheduler.add_noise(image, noise, timesteps)
    got = augment(image, level_from_if_noise_level(timesteps), noise)
    assert (got - expected).abs().max().item() <= 1e-6 * expected.abs().max().item() + 1e-6


@pytest.mark.parametrize("noise_level", [250, 20])
def test_if_two_conditioning_image_matches_the_super_resolution_pipelines_path(noise_level):
    """IFSuperResolutionPipeline: bilinear upscaling with align_corners, then the noising scheduler's add_noise at
    `noise_level`; ldm's `conditioning_image` in IF-II's resize mode at the level of that noise_level."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    low, _ = _images(seed=noise_level, shape=(2, 3, 8, 8))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(noise_level + 1))
    upscaled = torch.nn.functional.interpolate(low, (32, 32), mode="bilinear", align_corners=True)
    expected = scheduler.add_noise(upscaled, noise, torch.full((2,), noise_level))
    level = float(level_from_if_noise_level(noise_level))
    got = conditioning_image(low, 32, level, noise, mode="bilinear_align_corners")
    assert (got - expected).abs().max().item() <= 1e-6 * expected.abs().max().item() + 1e-6
    bicubic = conditioning_image(low, 32, level, noise)  # ldm's own SR stages' resize: far from IF-II's input
    assert (bicubic - expected).abs().max().item() > 1e-2


def test_if_and_imagen_pytorch_levels_known_values():
    # IF's noise_level 0 still leaves sigma = 0.0064 (our level 0.0041); its default 250 is level 0.2568
    _, sigma = aug_alpha_sigma(level_from_if_noise_level(0))
    assert abs(sigma.item() - 0.0064) < 1e-4
    assert abs(level_from_if_noise_level(250).item() - 0.2568) < 1e-3
    # near the cosine schedule's closed form (t + s) / (1 + s), up to the beta cap and float32 betas
    assert abs(level_from_if_noise_level(500).item() - (0.5 + 0.008) / 1.008) < 1e-3
    # imagen-pytorch: alpha^2 = sigmoid(log_snr), log_snr(t) = -log(expm1(1e-4 + 10 t^2)); t = 0 leaves sigma 0.01
    for t in (0.0, 0.2, 0.5):
        log_snr = -math.log(math.expm1(1e-4 + 10 * t * t))
        alpha, sigma = aug_alpha_sigma(level_from_imagen_pytorch(t))
        assert abs(alpha.item() - math.sqrt(1 / (1 + math.exp(-log_snr)))) < 1e-12
        assert abs(sigma.item() - math.sqrt(1 / (1 + math.exp(log_snr)))) < 1e-12
    assert abs(aug_alpha_sigma(level_from_imagen_pytorch(0.0))[1].item() - 0.01) < 1e-4
    assert abs(level_from_imagen_pytorch(0.2).item() - 0.3894) < 1e-3


def test_stage_config_checks():
    stage = from_dict(StageConfig, {"resolution": 256, "low_res_size": 64, "aug_level": 0.25})
    assert stage.dynamic_threshold == 0.995
    for bad in ({"aug_level": 1.5, "low_res_size": 8}, {"low_res_size": 64}, {"train_crop_size": 32},
                {"low_res_size": 16, "train_crop_size": 30}, {"resize_mode": "lanczos"}, {"dynamic_threshold": 99.5}):
        with pytest.raises(ConfigError):
            from_dict(StageConfig, {"resolution": 64, **bad})

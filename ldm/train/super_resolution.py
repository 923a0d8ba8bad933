"""Training inputs of a super-resolution stage: no base model, the low-res image is made from the sample itself.

Per sample: a level drawn uniformly in [0, stage.train_aug_level_max] (Saharia et al. 2022, Sec. 2.5), the target
downsampled to `low_res_size`, then exactly the sampling-time path (`conditioning_image`: upsample, augment). With
`train_crop_size` (the 1024 stage) the target, its low-res image and hence the noise are the same random crop: the
crop's offset lies on the low-res pixel grid, so the low-res crop is the low-res image of the crop's own pixels.
"""
from __future__ import annotations

import torch

from ldm.diffusion.noise_augmentation import (StageConfig, conditioning_image, downsample, sample_aug_levels,
                                              training_conditioning_image)


def random_crops(images: torch.Tensor, low_res: torch.Tensor, stage: StageConfig,
                 generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random `train_crop_size` crop of each target and of its low-res image (one offset per sample)."""
    ratio = stage.resolution // stage.low_res_size  # target pixels per low-res pixel
    crop, low_crop = stage.train_crop_size, stage.train_crop_size // ratio
    room = low_res.shape[-1] - low_crop + 1, low_res.shape[-2] - low_crop + 1
    targets, lows = [], []
    for image, low, g in zip(images, low_res, generators):
        left, top = (int(torch.randint(n, (1,), generator=g)) for n in room)  # in low-res pixels
        targets.append(image[:, top * ratio: top * ratio + crop, left * ratio: left * ratio + crop])
        lows.append(low[:, top: top + low_crop, left: left + low_crop])
    return torch.stack(targets), torch.stack(lows)


def super_resolution_inputs(images: torch.Tensor, stage: StageConfig, seeds: list[int],
                            device: torch.device) -> tuple[torch.Tensor, dict]:
    """Targets `b c h w` (cropped when `train_crop_size` is set) and the network's extra arguments `concat` (the
    augmented low-res image at the target's size) and `aug_level` (`b` floats), each drawn from the sample's seed."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]  # CPU: crops and levels (a few numbers each)
    # Everything per pixel runs on the training device: on the CPU, the resizes and 64 x 3 x 256 x 256 noise draws
    # of one batch took longer than the GPU's training step (190 img/s for a 3 M-parameter stage on an H200).
    images = images.to(device)
    low_res = None
    if stage.train_crop_size is not None:
        images, low_res = random_crops(images, downsample(images, stage.low_res_size), stage, generators)
    levels = torch.cat([sample_aug_levels(1, stage.train_aug_level_max, generator=g) for g in generators])
    levels = levels.to(device)
    # On the CPU the noise continues each sample's generator (as it always did); elsewhere a generator of that
    # device, seeded with the sample's seed: the same noise for the same sample on every run on that device kind.
    noise_generators = generators if device.type == "cpu" else [torch.Generator(device).manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(images.shape[1:], generator=g, device=device)
                         for g in noise_generators]).to(images.dtype)
    if low_res is None:  # the sample's own low-res image, then exactly the sampling-time path
        concat = training_conditioning_image(images, stage.low_res_size, levels, noise, stage.resize_mode)
    else:  # a crop of the whole image's low-res image (its pixels, not the crop's downsampling at the edges)
        concat = conditioning_image(low_res, tuple(images.shape[-2:]), levels, noise, stage.resize_mode)
    return images, {"concat": concat, "aug_level": levels}

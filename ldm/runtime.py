"""Where and how things run: the dtype names, the default device, and the seeds (the generator every sampling draws
from, and the seeds derived from a run's seed: one per rank, sample, epoch, worker, equal in every process)."""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from ldm.errors import ConfigError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype | None:
    """A torch dtype from "fp16" / "bf16" / "fp32" / a torch.dtype.

    None stays None (keep the stored precision) when no device is given; with a device it is the compute default:
    fp16 on a GPU, fp32 on the CPU.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device is None:
            return None
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> str:
    """The requested device, or CUDA when present."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return device


def seeded_generator(seed: int) -> torch.Generator:
    """The CPU generator a generation draws all its noise from: the same seed gives the same image on any device."""
    return torch.Generator("cpu").manual_seed(int(seed))


class ImageGenerators:
    """One CPU generator per image of a batch: image k's noise comes from `seeds[k]` alone, whatever the batch.

    `randn` draws row k of a batch from generator k, so image k equals the image of a batch of one seeded with
    `seeds[k]` (a CPU draw of one image's elements gives the same numbers with or without a batch axis).
    """

    device = torch.device("cpu")

    def __init__(self, seeds: list[int]):
        self.seeds = [int(s) for s in seeds]
        self.generators = [seeded_generator(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def subset(self, rows: list[int]) -> "ImageGenerators":
        """The generators of images `rows` (the same objects: a draw from the subset advances them), for a sampler
        that draws noise for some images of the batch only (`dpm_adaptive`'s accepted steps)."""
        subset = ImageGenerators([])
        subset.seeds = [self.seeds[k] for k in rows]
        subset.generators = [self.generators[k] for k in rows]
        return subset


def randn(shape: tuple[int, ...], generator: torch.Generator | ImageGenerators,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A normal draw of `shape` on the generator's device: from one generator, or row by row from `ImageGenerators`."""
    if isinstance(generator, ImageGenerators):
        if shape[0] != len(generator):
            raise ValueError(f"a batch of {shape[0]} drawn from {len(generator)} per-image generators")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generator.generators])
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from `parts` (e.g. seed, rank, sample index); SHA-256, so not Python's salted `hash`."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1

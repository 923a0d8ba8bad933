"""SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): image sizes, crop and aesthetic score as numbers that are
embedded sinusoidally and fed, beside the pooled text embedding, through the U-Net's `label_emb`.

The network takes the numbers themselves (`micro`, `b k`); the names say which numbers, in order:
the base model is conditioned on `original_size` (h, w), `crops_coords_top_left` (top, left) and `target_size`
(h, w): 6 numbers; the refiner on `original_size`, `crops_coords_top_left` and `aesthetic_score`: 5 numbers.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ldm.errors import LdmError
from ldm.models.unet_blocks import timestep_embedding

# how many numbers each name contributes
MICRO_FIELDS = {"original_size": 2, "crops_coords_top_left": 2, "target_size": 2, "aesthetic_score": 1}
SDXL_BASE = ("original_size", "crops_coords_top_left", "target_size")
SDXL_REFINER = ("original_size", "crops_coords_top_left", "aesthetic_score")
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' refiner defaults (StableDiffusionXLImg2ImgPipeline)


def micro_width(names: Sequence[str]) -> int:
    """How many numbers the micro-conditioning `names` hold (6 for the base model, 5 for the refiner)."""
    unknown = [n for n in names if n not in MICRO_FIELDS]
    if unknown:
        raise LdmError(f"unknown micro-conditioning {unknown}; known: {', '.join(MICRO_FIELDS)}")
    return sum(MICRO_FIELDS[n] for n in names)


def micro_embedding(micro: torch.Tensor, dim: int) -> torch.Tensor:
    """`b k` numbers -> `b (k dim)`: each number's sinusoidal embedding (cosines first), concatenated in order."""
    b, k = micro.shape
    return timestep_embedding(micro.reshape(b * k), dim).reshape(b, k * dim)


def micro_values(names: Sequence[str], height: int, width: int, given: Mapping | None = None, *,
                 negative: bool = False) -> list[float]:
    """The numbers for an image of `height` x `width`: diffusers' defaults (original and target size = the image size,
    crop (0, 0), aesthetic score 6.0 or 2.5 for the negative half) unless `given` names them.

    `given` keys: the names, and `negative_<name>` for the unconditional half (default: the positive value, except
    the aesthetic score).
    """
    given = dict(given or {})
    defaults = {"original_size": (height, width), "crops_coords_top_left": (0, 0), "target_size": (height, width),
                "aesthetic_score": (NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE,)}
    known = set(MICRO_FIELDS) | {f"negative_{n}" for n in MICRO_FIELDS}
    unknown = sorted(set(given) - known)
    if unknown:
        raise LdmError(f"unknown micro-conditioning setting(s) {unknown}; known: {', '.join(sorted(known))}")
    out = []
    for name in names:
        value = given.get(f"negative_{name}") if negative else None
        if value is None and not (negative and name == "aesthetic_score"):
            value = given.get(name)
        value = defaults[name] if value is None else value
        value = (value,) if isinstance(value, (int, float)) else tuple(value)
        if len(value) != MICRO_FIELDS[name]:
            raise LdmError(f"micro-conditioning {name} takes {MICRO_FIELDS[name]} number(s), got {list(value)}")
        out += [float(v) for v in value]
    return out


def with_micro_conditioning(cond: dict, names: Sequence[str], height: int, width: int,
                            given: Mapping | None = None) -> dict:
    """`cond` (network arguments, or `{"cond", "uncond"}` under guidance) with its `micro` numbers added per half."""
    if not names:
        return cond

    def add(half: dict, negative: bool) -> dict:
        ref = half["context"]
        row = torch.tensor(micro_values(names, height, width, given, negative=negative), device=ref.device)
        return {**half, "micro": row.expand(ref.shape[0], -1)}

    if "cond" in cond and "uncond" in cond:
        return {"cond": add(cond["cond"], False), "uncond": add(cond["uncond"], True)}
    return add(cond, False)

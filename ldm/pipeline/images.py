"""Conversions between PIL images and model tensors, and PNGs that carry their generation parameters."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ldm.atomic import atomic_path
from ldm.data.transforms import to_pil as tensor_to_pil
from ldm.errors import LdmError
from ldm.imagemodes import to_rgb8


def check_finite(images: torch.Tensor) -> None:
    """Refuse decoded images holding NaN/inf, with the usual cause and the way out."""
    if not torch.isfinite(images).all():
        raise LdmError("the decoded images hold NaN/inf values: a numerical failure (in fp16 often an overflow in "
                       "the autoencoder: try --dtype fp32 or bf16; in any dtype, settings that diverge such as a huge "
                       "--guidance)")


def to_pil(images: torch.Tensor, *, check: bool = True) -> list[Image.Image]:
    """`b 3 h w` in [-1, 1] -> PIL images, rounded as diffusers' image processor rounds them.

    NaN/inf values are an LdmError (`check_finite`), or black pixels with `check=False` (training grids).
    """
    if check:
        check_finite(images)
    return [tensor_to_pil(x) for x in images]


def from_pil(images: list[Image.Image] | Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images -> `b 3 h w` float tensor in [-1, 1]; `size` = (height, width) resizes with Lanczos."""
    if isinstance(images, Image.Image):
        images = [images]
    out = []
    for image in images:
        image = to_rgb8(image)
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


def mask_from_pil(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A mask image (white = repaint) -> `1 1 h w` tensor of 0/1 at `size` = (height, width)."""
    mask = mask.convert("L").resize((size[1], size[0]), Image.NEAREST)
    return (torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0) >= 0.5).float()[None, None]


def parameters_text(params: Mapping[str, Any]) -> str:
    """The A1111-style one-paragraph summary many image viewers show: prompt, then `key: value` pairs."""
    prompt = params.get("text", "")
    rest = ", ".join(f"{k}: {v}" for k, v in params.items() if k not in ("text", "file_name") and v is not None)
    negative = params.get("negative_prompt")
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(rest)
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike, params: Mapping[str, Any]) -> None:
    """Save a PNG atomically, with the generation parameters in its text chunks (JSON and A1111 `parameters`)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("ldm", json.dumps(dict(params), sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_parameters(path: str | os.PathLike) -> dict:
    """The generation parameters stored by `save_png`."""
    with Image.open(Path(path)) as image:
        return json.loads(image.text["ldm"])

"""Load a model from a path or hub id into a ready-to-sample pipeline."""
from __future__ import annotations

import sys

import torch

from ldm.errors import LdmError
from ldm.io.components import DTYPES


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """fp32 on the CPU, fp16 on a GPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise LdmError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> str:
    """The requested device, or CUDA when present."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LdmError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return device


def load_pipeline(model=None, *, device: str | None = None, dtype=None, allow_pickle: bool = False):
    """`load_pipeline("path/or/hub-id")` -> a callable pipeline: `pipe("a photo of a cat", seed=0)`."""
    from ldm.io.formats import load_model
    from ldm.pipeline.stable_diffusion import StableDiffusion

    if model is None:
        from ldm.pipeline.default_model import default_model_path

        model = default_model_path()
    device = resolve_device(device)
    components = load_model(str(model), allow_pickle=allow_pickle)
    for note in components.notes[1:]:  # the first note only names the format; the rest say what was assumed
        print(f"note: {note}", file=sys.stderr)
    return StableDiffusion(components, device=device, dtype=resolve_dtype(dtype, device))

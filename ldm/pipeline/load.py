"""Load a model from a path or hub id into a ready-to-sample pipeline."""
from __future__ import annotations

import sys


from ldm.io.formats import load_model
from ldm.pipeline.default_model import DEFAULT, default_model_path
from ldm.pipeline.pipeline import Pipeline
from ldm.runtime import resolve_device, resolve_dtype  # noqa: F401  (imported from here by the CLIs)


def load_pipeline(model=None, *, device: str | None = None, dtype=None, allow_pickle: bool = False):
    """`load_pipeline("path/or/hub-id")` -> a pipeline for whatever the model is: `pipe("a photo of a cat", seed=0)`.
    None or "default": the bundled model."""

    if model is None or model == DEFAULT:
        model = default_model_path()
    device = resolve_device(device)
    components = load_model(str(model), allow_pickle=allow_pickle)
    for note in components.notes[1:]:  # the first note only names the format; the rest say what was assumed
        print(f"note: {note}", file=sys.stderr)
    return Pipeline(components, device=device, dtype=resolve_dtype(dtype, device))

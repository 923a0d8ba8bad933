"""Load a model from a path or hub id into a ready-to-sample pipeline."""
from __future__ import annotations

import sys


from ldm.config import to_plain
from ldm.errors import LdmError
from ldm.io.formats import load_model
from ldm.io.vae_file import load_vae
from ldm.pipeline.default_model import DEFAULT, default_model_path
from ldm.pipeline.pipeline import Pipeline
from ldm.runtime import resolve_device, resolve_dtype  # noqa: F401  (imported from here by the CLIs)


def load_pipeline(model=None, *, device: str | None = None, dtype=None, allow_pickle: bool = False, vae=None,
                  ema: bool = True, config=None, prediction_type: str | None = None):
    """`load_pipeline("path/or/hub-id")` -> a pipeline for whatever the model is: `pipe("a photo of a cat", seed=0)`.

    `vae`: a VAE file or diffusers vae/ folder used in place of the model's (e.g. a fixed-fp16 SDXL VAE).
    `ema=False`: a single-file checkpoint's non-EMA U-Net weights where it holds both (diffusers' and A1111's choice;
    the default is the EMA weights, CompVis' choice).
    `config`: the original YAML of a single-file checkpoint (e.g. v2-inference-v.yaml, whose `parameterization: v`
    makes an SD-2 768-v file sample as v-prediction); `prediction_type` ("epsilon" | "v_prediction" | "sample", or
    eps / v / x0) overrides the model's (the weights cannot tell eps from v).
    None or "default": the bundled model.
    """

    if model is None or model == DEFAULT:
        model = default_model_path()
    device = resolve_device(device)
    components = load_model(str(model), allow_pickle=allow_pickle, ema=ema, config=config,
                            prediction_type=prediction_type)
    if vae is not None:
        replace_vae(components, vae, allow_pickle=allow_pickle)
    for note in components.notes[1:]:  # the first note only names the format; the rest say what was assumed
        print(f"note: {note}", file=sys.stderr)
    return Pipeline(components, device=device, dtype=resolve_dtype(dtype, device))


def replace_vae(components, vae, *, allow_pickle: bool = False) -> None:
    """Put the VAE at `vae` in place of the model's own, noting where it came from."""
    if components.autoencoder is None:
        raise LdmError(f"--vae {vae}: {components.source} is a pixel-space model; it has no VAE to replace")
    autoencoder, note = load_vae(vae, components.autoencoder.config, allow_pickle=allow_pickle)
    components.parts["autoencoder"] = autoencoder
    components.config["autoencoder"] = to_plain(autoencoder.config)
    components.notes.append(note)

"""One entry point for every weights format users have: `load_model`, and `save_native/diffusers/original`.

Formats: (a) a diffusers pipeline folder, (b) an original single-file `.safetensors` / `.ckpt` (CompVis /
Stability), (c) the native ldm folder, (d) a Hugging Face Hub id (downloaded when online).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ldm.diffusion.schedules import NETWORK_PREDICTIONS, PREDICTION_ALIASES
from ldm.errors import CheckpointError, ConfigError
from ldm.io.checkpoint import WEIGHT_SUFFIXES
from ldm.io.components import ModelParts, SDComponents
from ldm.io.diffusers_format import is_diffusers_folder, load_diffusers
from ldm.io.diffusers_format import save_diffusers as save_sd_diffusers
from ldm.io.hub import looks_like_hub_id, resolve_hub_id
from ldm.io.if_format import is_if_folder, load_if_diffusers, save_if_diffusers
from ldm.io.native_format import is_native_folder, load_native, save_native
from ldm.io.original_format import load_original, original_config, save_original
from ldm.io.sdxl_diffusers import is_sdxl_folder, load_sdxl_diffusers, save_sdxl_diffusers
from ldm.io.sdxl_original import is_sdxl

__all__ = ["ModelParts", "SDComponents", "load_model", "detect_format", "save_native", "save_diffusers", "save_original",
           "original_config", "FORMATS"]

FORMATS = ("original", "diffusers", "native")


def detect_format(path: Path) -> str:
    """'diffusers', 'native' or 'original' for a local path; CheckpointError if it is none of them."""
    if is_native_folder(path):
        return "native"
    if is_diffusers_folder(path):
        return "diffusers"
    if path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES:
        return "original"
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder that is neither a diffusers pipeline (model_index.json, unet/...) "
                              "nor a native ldm folder (config.yaml + unet.safetensors)")
    if path.is_file():
        raise CheckpointError(f"{path}: unknown weights format {path.suffix!r}; "
                              f"expected one of {list(WEIGHT_SUFFIXES)}")
    raise CheckpointError(f"checkpoint not found: {path}")


def load_model(path_or_id: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               allow_pickle: bool = False, config: str | Path | Mapping | None = None,
               prediction_type: str | None = None, ema: bool = True) -> ModelParts:
    """Load a model (its parts by role, and its schedule) from any supported format (dtype None keeps the stored
    precision). Diffusers and original files hold Stable Diffusion models; native folders any registered parts.

    `config`: an original-layout YAML (path or dict) for single-file checkpoints; `prediction_type`
    ("epsilon" | "v_prediction" | "sample", or eps / v / x0) overrides the schedule's (weights cannot tell eps from v). `ema=False`:
    a single file's non-EMA U-Net weights where it holds both (diffusers' `from_single_file` default); folders hold
    one set.
    """
    if prediction_type is not None:
        name = PREDICTION_ALIASES.get(prediction_type, prediction_type)  # eps / v / x0 too, as on the command line
        if name not in NETWORK_PREDICTIONS:  # "edm" would feed an SD network EDM's c_noise: noise out, no error
            raise ConfigError(f"prediction_type={prediction_type!r}: give what the network predicts, one of "
                              f"{', '.join(NETWORK_PREDICTIONS)} (or {', '.join(PREDICTION_ALIASES)}), or leave it out "
                              "(an EDM model's own config says edm)")
        prediction_type = name
    text = str(path_or_id)
    path = Path(text).expanduser()
    if not path.exists() and looks_like_hub_id(text):
        path = resolve_hub_id(text)
    kind = detect_format(path)
    if config is not None and kind != "original":
        raise ConfigError(f"--config/config= describes single-file checkpoints; {path} is a {kind} folder that "
                          "carries its own config")
    if kind == "native":
        return load_native(path, device=device, dtype=dtype, prediction_type=prediction_type)
    if kind == "diffusers" and is_if_folder(path):  # DeepFloyd IF stage I or II
        return load_if_diffusers(path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                 prediction_type=prediction_type)
    if kind == "diffusers":
        load = load_sdxl_diffusers if is_sdxl_folder(path) else load_diffusers
        return load(path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                              prediction_type=prediction_type)
    return load_original(path, device=device, dtype=dtype, allow_pickle=allow_pickle, config=config,
                         prediction_type=prediction_type, ema=ema)


def save_diffusers(components: ModelParts, folder: str | Path) -> None:
    """Write a diffusers pipeline folder: StableDiffusion(XL)Pipeline, whichever the model is."""
    (save_sdxl_diffusers if is_sdxl(components) else save_sd_diffusers)(components, folder)


def save(components: ModelParts, dst: str | Path, to: str) -> None:
    """Write `components` in format `to` ('original' | 'diffusers' | 'native'); a format that cannot hold the model
    says what it lacks before anything is written."""
    writers = {"original": save_original, "diffusers": save_diffusers, "native": save_native}
    if to not in writers:
        raise ConfigError(f"unknown format {to!r}; use one of {list(writers)}")
    if to == "diffusers" and "unet" in components.config and \
            components.config["unet"].get("type") == "if_unet":  # DeepFloyd IF: its own pipeline folder
        return save_if_diffusers(components, dst)
    writers[to](components, dst)

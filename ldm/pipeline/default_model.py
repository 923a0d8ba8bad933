"""The model `ldm-txt2img` uses when no --model is given."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from ldm.config import from_dict, load_yaml

from ldm.diffusion.schedules import ScheduleConfig

from ldm.errors import LdmError

from ldm.io.components import SDComponents

from ldm.io.native_format import save_native

from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL

from ldm.models.text_encoders import TextEncoderConfig, build_text_encoder

from ldm.models.unet import UNetConfig, UNetModel

ASSETS = Path(str(resources.files("ldm") / "assets"))
BUNDLED = ASSETS / "default-model"  # the project's trained model, when bundled
BUNDLED_UPSCALER = ASSETS / "default-upscaler"  # its 64 -> 256 super-resolution stage (`--upscaler default`)
DEFAULT = "default"  # the name that means the bundled model (`--model default`) or upscaler (`--upscaler default`)
TINY_RANDOM = ASSETS / "tiny-random-model.yaml"


def cache_dir() -> Path:
    """`$LDM_CACHE`, else `$XDG_CACHE_HOME/ldm`, else `~/.cache/ldm`."""
    if os.environ.get("LDM_CACHE"):
        return Path(os.environ["LDM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm"


def build_tiny_random(folder: Path) -> Path:
    """Write the tiny random-init model described by `tiny-random-model.yaml` (seed 0) as a native folder."""

    spec = load_yaml(TINY_RANDOM)
    sections = {k: spec[k] for k in ("unet", "autoencoder", "text_encoder", "scheduler")}
    torch.manual_seed(int(spec.get("seed", 0)))
    components = SDComponents(
        unet=UNetModel(from_dict(UNetConfig, sections["unet"])),
        autoencoder=AutoencoderKL(from_dict(AutoencoderConfig, sections["autoencoder"])),
        text_encoder=build_text_encoder(from_dict(TextEncoderConfig, sections["text_encoder"])),
        schedule=from_dict(ScheduleConfig, sections["scheduler"]),
        config=sections,
        source="tiny-random (ldm/assets/tiny-random-model.yaml)",
    )
    save_native(components, folder)
    return folder


def default_model_path() -> Path:
    """The bundled trained model if present, else the tiny random stand-in (built once into the cache)."""
    if (BUNDLED / "config.yaml").is_file():
        return BUNDLED
    folder = cache_dir() / "tiny-random-v1"
    if not (folder / "config.yaml").is_file():
        build_tiny_random(folder)
    return folder


def default_upscaler_path() -> Path:
    """The bundled 64 -> 256 super-resolution stage of the default model (docs/imagen.md)."""
    if not (BUNDLED_UPSCALER / "config.yaml").is_file():
        raise LdmError(f"--upscaler default: no bundled upscaler in {BUNDLED_UPSCALER} (none trained so far beats "
                       "bicubic upsampling, docs/imagen.md); give a trained super-resolution stage's folder instead, "
                       "e.g. one made with tools/device_train_sr.sh")
    return BUNDLED_UPSCALER

"""The registry of part types: how a config section with a given `type` is read and its network built.

A model config is sections by role (`unet`, `autoencoder`, `text_encoder`, ... plus `scheduler`). A section names its
kind with `type`; sections written before `type` existed get their role's default (`DEFAULT_TYPES`). A new model
family registers its network here (`register_part_type`) and is then read, built and saved by every format.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from ldm.config import from_dict, to_plain
from ldm.errors import ConfigError
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.efficient_unet import EfficientUNet, EfficientUNetConfig
from ldm.models.if_unet import IFUNet, IFUNetConfig
from ldm.models.sdxl_text import SDXLTextConfig, build_sdxl_text_encoder
from ldm.models.text_encoders import TEXT_ENCODER_TYPES, TextEncoderConfig, build_text_encoder
from ldm.models.unet import UNetConfig, UNetModel


@dataclass(frozen=True)
class PartType:
    """One kind of part: its config dataclass, how a section becomes one, and how the network is built from it."""

    config_class: type
    read_config: Callable[[Mapping], Any]  # section (without `type` unless the config keeps it) -> config
    build: Callable[..., nn.Module]  # (config, tokenizer_dir=None) -> module with random weights
    keeps_type: bool = False  # the config dataclass has its own `type` field (text encoders: clip, t5, ...)


PART_TYPES: dict[str, PartType] = {}
DEFAULT_TYPES = {"unet": "unet", "autoencoder": "autoencoder_kl"}  # roles whose old sections carry no `type`


def register_part_type(name: str, part_type: PartType) -> None:
    """Make sections of `type: name` readable and buildable by every format."""
    PART_TYPES[name] = part_type


def unet_config(section: Mapping) -> UNetConfig:
    """UNetConfig from a native section, or from CompVis `unet_config.params` (keys we do not model are dropped)."""
    names = {f.name for f in dataclasses.fields(UNetConfig)}
    params = {k: v for k, v in section.items() if k in names}
    if params.get("num_classes") == "sequential":  # CompVis' name for a pooled-vector (adm) embedding
        params["num_classes"] = None
    if params.get("num_head_channels", -1) != -1 and "num_heads" not in params:
        params["num_heads"] = -1
    return from_dict(UNetConfig, params, where="unet config")


def autoencoder_config(section: Mapping) -> AutoencoderConfig:
    """AutoencoderConfig from a native section or CompVis ddconfig (+ embed_dim, scale_factor)."""
    names = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    return from_dict(AutoencoderConfig, {k: v for k, v in section.items() if k in names}, where="autoencoder config")


def text_config(section: Mapping) -> TextEncoderConfig:
    """TextEncoderConfig from a native section."""
    return from_dict(TextEncoderConfig, section, where="text_encoder config")


def _build_text(cfg: TextEncoderConfig, tokenizer_dir: str | Path | None = None) -> nn.Module:
    return build_text_encoder(dataclasses.replace(cfg, pretrained=None), tokenizer_dir=tokenizer_dir)


register_part_type("unet", PartType(UNetConfig, unet_config, lambda cfg, tokenizer_dir=None: UNetModel(cfg)))
register_part_type("autoencoder_kl", PartType(AutoencoderConfig, autoencoder_config,
                                              lambda cfg, tokenizer_dir=None: AutoencoderKL(cfg)))
register_part_type("efficient_unet", PartType(  # Imagen's pixel-space U-Net (base and super-resolution stages)
    EfficientUNetConfig, lambda section: from_dict(EfficientUNetConfig, section, where="efficient_unet config"),
    lambda cfg, tokenizer_dir=None: EfficientUNet(cfg)))
register_part_type("if_unet", PartType(  # DeepFloyd IF's pixel U-Net (stages I and II; docs/deepfloyd-if.md)
    IFUNetConfig, lambda section: from_dict(IFUNetConfig, section, where="if_unet config"),
    lambda cfg, tokenizer_dir=None: IFUNet(cfg)))
register_part_type("sdxl", PartType(  # SDXL's CLIP ViT-L + OpenCLIP bigG (the refiner: bigG only)
    SDXLTextConfig, lambda section: from_dict(SDXLTextConfig, section, where="text_encoder config"),
    lambda cfg, tokenizer_dir=None: build_sdxl_text_encoder(cfg), keeps_type=True))
for _name in TEXT_ENCODER_TYPES:
    register_part_type(_name, PartType(TextEncoderConfig, text_config, _build_text, keeps_type=True))


def section_type(role: str, section: Mapping) -> str:
    """The registered type of a config section: its `type`, else its role's default."""
    name = section.get("type", DEFAULT_TYPES.get(role))
    if name is None:
        raise ConfigError(f"config section {role!r} names no `type`; give one of {', '.join(PART_TYPES)}")
    if name not in PART_TYPES:
        raise ConfigError(f"config section {role!r}: unknown type {name!r}; known types: {', '.join(PART_TYPES)}")
    return name


def read_section(role: str, section: Mapping) -> Any:
    """A config section -> its config dataclass, through the registry."""
    name = section_type(role, section)
    entry = PART_TYPES[name]
    params = section if entry.keeps_type else {k: v for k, v in section.items() if k != "type"}
    return entry.read_config(params)


def type_of(config: Any) -> str:
    """The registered type name of a config dataclass."""
    own = getattr(config, "type", None)
    if own in PART_TYPES:
        return own
    for name, entry in PART_TYPES.items():
        if type(config) is entry.config_class and not entry.keeps_type:
            return name
    raise ConfigError(f"no part type is registered for {type(config).__name__}")


def section_dict(role: str, config: Any) -> dict:
    """A config dataclass as a plain section; `type` is written unless it is the role's old default."""
    plain = to_plain(config)
    name = type_of(config)
    if "type" not in plain and DEFAULT_TYPES.get(role) != name:
        plain = {"type": name, **plain}
    return plain


def build_part(config: Any, tokenizer_dir: str | Path | None = None) -> nn.Module:
    """A network with random weights from its config dataclass."""
    return PART_TYPES[type_of(config)].build(config, tokenizer_dir=tokenizer_dir)

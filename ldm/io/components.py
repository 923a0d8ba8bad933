"""The loaded model: `ModelParts` (networks by role plus a schedule), built from config sections and state dicts."""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ldm.config import to_plain
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import ConfigError, LdmError
from ldm.io.checkpoint import load_into
from ldm.io.part_types import (autoencoder_config, build_part, section_dict, section_type, text_config,  # noqa: F401
                               unet_config)
from ldm.models.codecs import IdentityCodec, KLCodec
from ldm.models.text_encoders import TextEncoderConfig
from ldm.runtime import DTYPES, resolve_dtype  # noqa: F401  (re-exported: the former home)

class ModelParts:
    """A model: its networks held by role ("unet", "autoencoder", "text_encoder", ...) plus its noise schedule.

    `parts["unet"]`, `parts.get("autoencoder")`; `parts.unet` / `.autoencoder` / `.text_encoder` read the usual
    roles (None when absent, except the U-Net). `codec` maps images to the denoiser's space: the KL autoencoder
    when the model has one, the identity for a pixel-space model. `config` holds the resolved sections by role
    plus "scheduler" (plain dicts, as the native config.yaml holds them).
    """

    def __init__(self, parts: Mapping[str, nn.Module] | None = None, *, schedule: ScheduleConfig, config: dict,
                 source: str = "", notes: list[str] | None = None, **by_role: nn.Module | None):
        self.parts: dict[str, nn.Module] = {**(parts or {}), **{k: v for k, v in by_role.items() if v is not None}}
        self.schedule = schedule
        self.config = config
        self.source = source
        self.notes = list(notes or [])

    def __getitem__(self, role: str) -> nn.Module:
        if role not in self.parts:
            raise ConfigError(f"the model from {self.source or 'memory'} has no {role!r} part "
                              f"(it has {', '.join(self.parts) or 'none'})")
        return self.parts[role]

    def __contains__(self, role: str) -> bool:
        return role in self.parts

    def get(self, role: str, default=None):
        return self.parts.get(role, default)

    @property
    def roles(self) -> list[str]:
        return list(self.parts)

    @property
    def unet(self) -> nn.Module:
        return self["unet"]

    @property
    def autoencoder(self) -> nn.Module | None:
        return self.parts.get("autoencoder")

    @property
    def text_encoder(self) -> nn.Module | None:
        return self.parts.get("text_encoder")

    @property
    def codec(self) -> nn.Module:
        """The image <-> denoiser-space map: KL autoencoder (latent model) or identity (pixel model)."""
        return codec_for(self.parts)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ModelParts":
        """Move (and cast) every network in place."""
        for module in self.parts.values():
            module.to(device=device, dtype=dtype)
        return self


PIXEL_CHANNELS = 3  # a pixel-space model denoises RGB images


def codec_for(parts: Mapping[str, nn.Module]) -> nn.Module:
    """The codec of a set of parts: KLCodec over its autoencoder, or IdentityCodec for a pixel-space model."""
    autoencoder = parts.get("autoencoder")
    return KLCodec(autoencoder) if autoencoder is not None else IdentityCodec(PIXEL_CHANNELS)


def SDComponents(unet: nn.Module, autoencoder: nn.Module | None, text_encoder: nn.Module | None,  # noqa: N802
                 schedule: ScheduleConfig, config: dict, source: str = "",
                 notes: list[str] | None = None) -> ModelParts:
    """The parts of a Stable Diffusion model (U-Net, autoencoder, text encoder): the former fixed triple."""
    return ModelParts(unet=unet, autoencoder=autoencoder, text_encoder=text_encoder, schedule=schedule,
                      config=config, source=source, notes=notes)

def stored_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The most common floating dtype among the weights (float32 if none)."""
    counts = Counter(v.dtype for v in sd.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
          "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Skip torch.nn.init while building modules whose every weight is about to be loaded (seconds for SD)."""
    saved = {name: getattr(nn.init, name) for name in _INITS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def text_config_from_dims(dims: Mapping, *, layer: str | None = None,
                          max_length: int | None = None) -> TextEncoderConfig:
    """TextEncoderConfig from the sizes `infer_text_encoder` reads off the weights."""
    if dims["type"] == "clip":
        hf = dict(vocab_size=dims["vocab_size"], hidden_size=dims["width"], intermediate_size=dims["intermediate_size"],
                  num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                  max_position_embeddings=dims["context_length"], hidden_act="quick_gelu", projection_dim=dims["width"])
        return TextEncoderConfig(type="clip", layer=layer or "last", max_length=max_length, hf_config=hf)
    text_cfg = dict(context_length=dims["context_length"], vocab_size=dims["vocab_size"], width=dims["width"],
                    heads=dims["heads"], layers=dims["layers"], mlp_ratio=dims["intermediate_size"] / dims["width"])
    return TextEncoderConfig(type="openclip", layer=layer or "penultimate", max_length=max_length,
                             open_clip={"embed_dim": dims["embed_dim"], "text_cfg": text_cfg, "quick_gelu": False})


def build_module(cfg, sd: Mapping[str, torch.Tensor], *, source: str, device, dtype,
                 tokenizer_dir: str | Path | None = None) -> nn.Module:
    """Build the part `cfg` describes, check and load `sd`, cast to `dtype` (None: as stored), move."""
    with skip_weight_init():
        module = build_part(cfg, tokenizer_dir=tokenizer_dir)
    load_into(module, sd, source=source, assign=True)  # the file's tensors themselves: no cast, no copy
    module.to(dtype=stored_dtype(sd))  # what the file does not hold (masks, position ids) follows its precision
    return module.to(device=device, dtype=dtype)


def resolved_config(unet, autoencoder, text, schedule: ScheduleConfig) -> dict:
    """The sections of a Stable Diffusion model as plain dicts (what the native config.yaml holds)."""
    return config_sections({"unet": unet, "autoencoder": autoencoder, "text_encoder": text}, schedule)


def config_sections(configs: Mapping[str, Any], schedule: ScheduleConfig) -> dict:
    """Config dataclasses by role (None entries dropped) plus the schedule, as plain config.yaml sections."""
    out = {role: section_dict(role, cfg) for role, cfg in configs.items() if cfg is not None}
    return {**out, "scheduler": to_plain(schedule)}


def make_parts(sections: dict, weights: dict[str, Mapping[str, torch.Tensor]], *, source: str, sources: dict,
               device, dtype, prediction_type: str | None, notes: list[str],
               tokenizer_dir: str | Path | None = None) -> ModelParts:
    """Build every part from config objects by role (`sections`, "scheduler" among them) and their weights."""
    schedule = sections["scheduler"]
    if prediction_type is not None:
        schedule = dataclasses.replace(schedule, prediction_type=prediction_type)
    dtype = resolve_dtype(dtype)
    configs = {role: cfg for role, cfg in sections.items() if role != "scheduler"}
    parts = {role: build_module(cfg, weights[role], source=sources[role], device=device, dtype=dtype,
                                tokenizer_dir=tokenizer_dir if role == "text_encoder" else None)
             for role, cfg in configs.items()}
    return ModelParts(parts, schedule=schedule, config=config_sections(configs, schedule), source=source, notes=notes)


make_components = make_parts  # the former name


SD_PARTS = {"unet": ("unet",), "autoencoder": ("autoencoder_kl",), "text_encoder": ("clip", "openclip")}


def check_can_hold(parts: ModelParts, target: str, holds: Mapping[str, tuple[str, ...]] = SD_PARTS) -> None:
    """Refuse, before anything is written, a model whose parts the `target` format has no place for."""
    types = {role: section_type(role, parts.config[role]) for role in parts.roles}
    layout = ", ".join(f"{role} ({'/'.join(kinds)})" for role, kinds in holds.items())
    for role, kind in types.items():
        if role not in holds or kind not in holds[role]:
            raise LdmError(f"{target} holds {layout}; it cannot hold this model's {role} part of type {kind!r}: "
                           "save it in the native format (--to native)")
    absent = [role for role in holds if role not in types]
    if absent:
        raise LdmError(f"{target} holds {layout}; this model has no {' or '.join(absent)} part (a pixel-space model "
                       "has no autoencoder): save it in the native format (--to native)")

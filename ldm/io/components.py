"""The loaded model: `SDComponents`, and building its modules from config sections plus state dicts."""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from ldm.config import from_dict, to_plain
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import ConfigError
from ldm.io.checkpoint import load_into
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.text_encoders import TextEncoder, TextEncoderConfig, build_text_encoder
from ldm.models.unet import UNetConfig, UNetModel

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class SDComponents:
    """A latent text-to-image model: networks, the training schedule, the resolved config and where it came from."""

    unet: UNetModel
    autoencoder: AutoencoderKL
    text_encoder: TextEncoder
    schedule: ScheduleConfig
    config: dict  # resolved: {"unet", "autoencoder", "text_encoder", "scheduler"} as plain dicts
    source: str
    notes: list[str] = field(default_factory=list)  # what was inferred or assumed while loading

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "SDComponents":
        """Move (and cast) the three networks in place."""
        for module in (self.unet, self.autoencoder, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from "fp16" / "bf16" / "fp32" / a torch.dtype / None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use fp16, bf16 or fp32")
    return DTYPES[dtype]


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


def text_config(section: Mapping) -> TextEncoderConfig:
    """TextEncoderConfig from a native section."""
    return from_dict(TextEncoderConfig, section, where="text_encoder config")


def build_module(kind: str, cfg, sd: Mapping[str, torch.Tensor], *, source: str, device, dtype,
                 tokenizer_dir: str | Path | None = None) -> nn.Module:
    """Build a UNet / autoencoder / text encoder, check and load `sd`, cast to `dtype` (None: as stored), move."""
    with skip_weight_init():
        if kind == "unet":
            module = UNetModel(cfg)
        elif kind == "autoencoder":
            module = AutoencoderKL(cfg)
        else:
            module = build_text_encoder(dataclasses.replace(cfg, pretrained=None), tokenizer_dir=tokenizer_dir)
    module.to(dtype=stored_dtype(sd))  # a lossless load: the module takes the file's precision
    load_into(module, sd, source=source)
    return module.to(device=device, dtype=dtype)


def resolved_config(unet: UNetConfig, autoencoder: AutoencoderConfig, text: TextEncoderConfig,
                    schedule: ScheduleConfig) -> dict:
    """The four config sections as plain dicts (what the native config.yaml holds)."""
    return {"unet": to_plain(unet), "autoencoder": to_plain(autoencoder), "text_encoder": to_plain(text),
            "scheduler": to_plain(schedule)}


def make_components(sections: dict, weights: dict[str, Mapping[str, torch.Tensor]], *, source: str, sources: dict,
                    device, dtype, prediction_type: str | None, notes: list[str],
                    tokenizer_dir: str | Path | None = None) -> SDComponents:
    """Build all components from config objects (`sections`: unet, autoencoder, text_encoder, scheduler)."""
    schedule = sections["scheduler"]
    if prediction_type is not None:
        schedule = dataclasses.replace(schedule, prediction_type=prediction_type)
    dtype = resolve_dtype(dtype)
    unet = build_module("unet", sections["unet"], weights["unet"], source=sources["unet"], device=device, dtype=dtype)
    vae = build_module("autoencoder", sections["autoencoder"], weights["autoencoder"], source=sources["autoencoder"],
                       device=device, dtype=dtype)
    text = build_module("text_encoder", sections["text_encoder"], weights["text_encoder"],
                        source=sources["text_encoder"], device=device, dtype=dtype, tokenizer_dir=tokenizer_dir)
    config = resolved_config(sections["unet"], sections["autoencoder"], sections["text_encoder"], schedule)
    return SDComponents(unet, vae, text, schedule, config, source, notes)

"""SDXL text-encoder key maps and configs: native (sgm's `conditioner.embedders.{i}` without `conditioner.`) <->
diffusers' `text_encoder/` (transformers CLIPTextModel, CLIP ViT-L) and `text_encoder_2/` (CLIPTextModelWithProjection,
OpenCLIP bigG with its projection as `text_projection.weight`, the transpose of open_clip's `text_projection`)."""
from __future__ import annotations

from typing import Mapping

import torch

from ldm.errors import CheckpointError, ConfigError
from ldm.io.keys_text import hf_clip_config_from_openclip, hf_clip_to_openclip, openclip_to_hf_clip
from ldm.models.sdxl_text import SDXLTextConfig

CLIP_L = "embedders.0.transformer.text_model."  # CLIP ViT-L's keys (the base model's first embedder)


def bigg_prefix(config: SDXLTextConfig) -> str:
    """The open_clip tower's key prefix: `embedders.1.model.` (base), `embedders.0.model.` (refiner, bigG only)."""
    return f"embedders.{0 if config.clip is None else 1}.model."


def open_clip_config(config: SDXLTextConfig) -> dict:
    """The open_clip tower's `embed_dim` + `text_cfg` (a named model resolved through open_clip's own configs)."""
    cfg = dict(config.open_clip)
    if "name" in cfg:
        import open_clip

        found = open_clip.get_model_config(cfg.pop("name"))
        if found is None:
            raise ConfigError(f"unknown open_clip model name {config.open_clip['name']!r}")
        cfg = {**found, **cfg}
    return {k: v for k, v in cfg.items() if k in ("embed_dim", "text_cfg", "quick_gelu")}


def sdxl_text_to_diffusers(sd: Mapping[str, torch.Tensor],
                           config: SDXLTextConfig) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """Native SDXL text weights -> (text_encoder/ weights or None for the refiner, text_encoder_2/ weights)."""
    first = None
    if config.clip is not None:
        first = {"text_model." + k[len(CLIP_L):]: v for k, v in sd.items() if k.startswith(CLIP_L)}
    prefix = bigg_prefix(config)
    second = openclip_to_hf_clip(sd, prefix=prefix, hf_prefix="text_model.", drop_last_layer=False)
    if prefix + "text_projection" not in sd:
        raise CheckpointError(f"SDXL text weights: no {prefix}text_projection (the pooled projection)")
    second["text_projection.weight"] = sd[prefix + "text_projection"].t().contiguous()
    return first, second


def sdxl_text_from_diffusers(first: Mapping[str, torch.Tensor] | None,
                             second: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' text_encoder/ (None for the refiner) and text_encoder_2/ weights -> native SDXL text weights."""
    out = {}
    if first is not None:
        out.update({CLIP_L + k.removeprefix("text_model."): v for k, v in first.items()
                    if not k.endswith("position_ids") and k != "text_projection.weight"})
    if "text_projection.weight" not in second:
        raise CheckpointError("text_encoder_2: no text_projection.weight (SDXL's second encoder is a "
                              "CLIPTextModelWithProjection)")
    prefix = f"embedders.{0 if first is None else 1}.model."
    bigg = hf_clip_to_openclip({k: v for k, v in second.items() if not k.endswith("position_ids")}, prefix=prefix,
                               pad_last_layer=False)
    bigg.pop(prefix + "logit_scale")  # made up by the converter; SDXL's encoder has no contrastive temperature
    return {**out, **bigg}


def hf_configs(config: SDXLTextConfig) -> tuple[dict | None, dict]:
    """(CLIPTextConfig kwargs of text_encoder/ or None, of text_encoder_2/) for the SDXL text config."""
    second = hf_clip_config_from_openclip(open_clip_config(config), drop_last_layer=False)
    return (dict(config.clip) if config.clip is not None else None), second


def sdxl_text_config_from_hf(first: Mapping | None, second: Mapping, *,
                             force_zeros_for_empty_prompt: bool) -> SDXLTextConfig:
    """SDXLTextConfig from diffusers' text_encoder/ (None: the refiner) and text_encoder_2/ config.json dicts."""
    if second.get("hidden_act", "gelu") not in ("gelu", "quick_gelu"):
        raise ConfigError(f"text_encoder_2: hidden_act {second['hidden_act']!r} has no open_clip equivalent")
    width = second["hidden_size"]
    text_cfg = dict(context_length=second.get("max_position_embeddings", 77), vocab_size=second["vocab_size"],
                    width=width, heads=second["num_attention_heads"], layers=second["num_hidden_layers"],
                    mlp_ratio=second["intermediate_size"] / width)
    open_clip_cfg = {"embed_dim": second.get("projection_dim", width), "text_cfg": text_cfg,
                     "quick_gelu": second.get("hidden_act") == "quick_gelu"}
    clip = None
    if first is not None:
        keys = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id",
                "bos_token_id", "eos_token_id")
        clip = {k: first[k] for k in keys if k in first}
    return SDXLTextConfig(clip=clip, open_clip=open_clip_cfg, max_length=text_cfg["context_length"],
                          force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

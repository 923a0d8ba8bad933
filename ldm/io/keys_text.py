"""Text-encoder key maps: open_clip text tower (SD-2 `cond_stage_model.model.*`) <-> transformers `CLIPTextModel`.

SD-2 conditions on the *penultimate* layer of OpenCLIP ViT-H/14 (24 blocks, then `ln_final`). diffusers therefore
ships SD-2's text encoder as a 23-layer `CLIPTextModel`: its `last_hidden_state` (23 blocks + final_layer_norm)
is exactly the penultimate output, and the unused 24th block and `text_projection` are dropped
(`drop_last_layer=True` here). Going back, the dropped block cannot be recreated: `hf_clip_to_openclip` appends an
*identity* block (zero output projections, so `x + 0 + 0`) so that the result loads strictly into an open_clip
model with the original depth; its penultimate output is exact and its "last" output equals the penultimate one.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from ldm.errors import CheckpointError

_BLOCK_TO_HF = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                "attn.out_proj": "self_attn.out_proj"}
_BLOCK_FROM_HF = {v: k for k, v in _BLOCK_TO_HF.items()}
_TOP_TO_HF = {"token_embedding.weight": "embeddings.token_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight",
              "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}
_IGNORED_OPENCLIP = {"text_projection", "logit_scale", "logit_bias", "attn_mask"}  # not part of CLIPTextModel


def _num_blocks(keys, pattern: str) -> int:
    found = [int(m[1]) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def openclip_to_hf_clip(sd: Mapping[str, torch.Tensor], prefix: str = "model.", hf_prefix: str = "text_model.",
                        drop_last_layer: bool = True) -> dict[str, torch.Tensor]:
    """open_clip text keys (`{prefix}transformer.resblocks.{i}...`) -> `CLIPTextModel` keys (`{hf_prefix}encoder...`).

    `hf_prefix="text_model."` gives the layout of diffusers' converter and of published `text_encoder/` folders;
    pass `""` for the in-memory keys of a transformers >= 5 `CLIPTextModel`. The visual tower, `text_projection`
    and `logit_scale` are left out; `drop_last_layer` drops the last block (SD-2 uses the penultimate layer).
    """
    text = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "token_embedding.weight" not in text:
        raise CheckpointError(f"no open_clip text tower under prefix {prefix!r} "
                              f"(missing {prefix}token_embedding.weight)")
    blocks = _num_blocks(text, r"transformer\.resblocks\.(\d+)\.")
    keep = blocks - 1 if drop_last_layer else blocks
    out, unknown = {}, []
    for key, value in text.items():
        if key in _TOP_TO_HF:
            out[hf_prefix + _TOP_TO_HF[key]] = value
            continue
        if key in _IGNORED_OPENCLIP or key.startswith("visual."):
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)", key)  # in_proj_weight: "_"
        if m is None or (m[2] not in _BLOCK_TO_HF and m[2] != "attn.in_proj"):
            unknown.append(prefix + key)
            continue
        if int(m[1]) >= keep:
            continue
        base = f"{hf_prefix}encoder.layers.{m[1]}."
        if m[2] == "attn.in_proj":  # one packed `3d d` projection -> q, k, v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}.{m[3]}"] = part.clone()
        else:
            out[f"{base}{_BLOCK_TO_HF[m[2]]}.{m[3]}"] = value
    if unknown:
        raise CheckpointError(f"open_clip text tower: {len(unknown)} key(s) have no CLIPTextModel equivalent, "
                              f"first: {unknown[:5]}")
    return out


def hf_clip_to_openclip(sd: Mapping[str, torch.Tensor], prefix: str = "model.", pad_last_layer: bool = True,
                        text_projection: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`CLIPTextModel` keys (with or without `text_model.`) -> open_clip text keys under `prefix`.

    `pad_last_layer` appends the identity block described in the module docstring. `text_projection`
    (`width embed_dim`) is taken from the argument, else from a `CLIPTextModelWithProjection`'s
    `text_projection.weight`, else set to the identity (right for SD-2, where embed_dim == width).
    """
    hf = {k.removeprefix("text_model."): v for k, v in sd.items()}
    if "embeddings.token_embedding.weight" not in hf:
        raise CheckpointError("not a CLIPTextModel state dict (missing embeddings.token_embedding.weight)")
    width = hf["embeddings.token_embedding.weight"].shape[1]
    out, qkv, unknown = {}, {}, []
    for key, value in hf.items():
        if key in _TOP_FROM_HF:
            out[prefix + _TOP_FROM_HF[key]] = value
            continue
        if key == "embeddings.position_ids":
            continue
        if key == "text_projection.weight":
            text_projection = value.t().contiguous() if text_projection is None else text_projection
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            unknown.append(key)
        elif m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv[(int(m[1]), m[3], m[2].split(".")[1][0])] = value  # (layer, weight|bias, q|k|v)
        elif m[2] in _BLOCK_FROM_HF:
            out[f"{prefix}transformer.resblocks.{m[1]}.{_BLOCK_FROM_HF[m[2]]}.{m[3]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"CLIPTextModel: {len(unknown)} key(s) have no open_clip equivalent, "
                              f"first: {unknown[:5]}")
    layers = 1 + max((i for i, _, _ in qkv), default=-1)
    for i in range(layers):
        for kind in ("weight", "bias"):
            parts = [qkv.get((i, kind, c)) for c in "qkv"]
            if any(p is None for p in parts):
                raise CheckpointError(f"CLIPTextModel layer {i}: missing one of q/k/v_proj.{kind}")
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    if pad_last_layer:
        out.update(_identity_block(f"{prefix}transformer.resblocks.{layers}.", out, prefix, layers))
    reference = hf["embeddings.token_embedding.weight"]
    if text_projection is None:
        text_projection = torch.eye(width, dtype=reference.dtype)
    out[prefix + "text_projection"] = text_projection
    out[prefix + "logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=reference.dtype)  # open_clip's init value
    return out


def _identity_block(base: str, out: dict, prefix: str, layers: int) -> dict[str, torch.Tensor]:
    """A residual block whose attention and MLP outputs are zero, shaped like block `layers - 1`."""
    if layers == 0:
        raise CheckpointError("cannot pad a CLIPTextModel with no layers")
    last = f"{prefix}transformer.resblocks.{layers - 1}."
    block = {}
    for key, value in out.items():
        if key.startswith(last):
            name = key[len(last):]
            block[base + name] = torch.ones_like(value) if name in ("ln_1.weight", "ln_2.weight") \
                else torch.zeros_like(value)
    return block


def hf_clip_config_from_openclip(model_cfg: Mapping, drop_last_layer: bool = True) -> dict:
    """open_clip model config (`embed_dim`, `text_cfg`, `quick_gelu`) -> `CLIPTextConfig` keyword arguments."""
    text = dict(model_cfg.get("text_cfg", {}))
    unsupported = {k: text[k] for k in ("hf_model_name", "ls_init_value", "embed_cls", "no_causal_mask", "qk_norm",
                                        "scaled_cosine_attn", "scale_attn", "scale_fc", "final_ln_after_pool")
                   if text.get(k)}
    if unsupported:
        raise CheckpointError(f"open_clip text config {unsupported} has no CLIPTextModel equivalent")
    width, layers = text.get("width", 512), text.get("layers", 12)
    return {
        "vocab_size": text.get("vocab_size", 49408),
        "hidden_size": width,
        "intermediate_size": int(width * text.get("mlp_ratio", 4.0)),
        "num_hidden_layers": layers - 1 if drop_last_layer else layers,
        "num_attention_heads": text.get("heads", 8),
        "max_position_embeddings": text.get("context_length", 77),
        "hidden_act": "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": model_cfg.get("embed_dim", 512),
        "bos_token_id": 49406,
        "eos_token_id": 49407,  # pooled output at the first end-of-text token, as open_clip's argmax pooling
        "pad_token_id": 0,
    }

"""DeepFloyd IF's U-Net: diffusers `UNet2DConditionModel` keys and config.json <-> ldm's `IFUNet` (pure maps).

The native keys follow ADM's layout (input_blocks / middle_block / output_blocks / out, docs/deepfloyd-if.md); the map
is derived from the network's own module tree, so it covers every key of every configuration both ways.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ldm.errors import CheckpointError, ConfigError
from ldm.models.if_unet import IFUNet, IFUNetConfig

DOWN_PLAIN, DOWN_ATTN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
UP_PLAIN, UP_ATTN = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"
MID = "UNetMidBlock2DSimpleCrossAttn"

# Settings of UNet2DConditionModel that IF's network does not use: the value it must have (diffusers' default).
_FIXED = {"flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "only_cross_attention": False,
          "resnet_skip_time_act": False, "class_embeddings_concat": False, "time_embedding_type": "positional",
          "conv_in_kernel": 3, "conv_out_kernel": 3, "dual_cross_attention": False, "norm_num_groups": 32,
          "resnet_out_scale_factor": 1.0, "timestep_post_act": None, "time_cond_proj_dim": None,
          "num_class_embeds": None, "downsample_padding": 1, "mid_block_only_cross_attention": None}

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
        "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_ATTN = {"group_norm": "norm", "norm_cross": "norm_context", "to_q": "to_q", "to_k": "to_k", "to_v": "to_v",
         "add_k_proj": "to_k_context", "add_v_proj": "to_v_context", "to_out.0": "to_out"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "class_embedding.linear_1": "aug_level_embed.0", "class_embedding.linear_2": "aug_level_embed.2",
        "add_embedding.norm1": "text_pool.norm_in", "add_embedding.pool": "text_pool",
        "add_embedding.proj": "text_pool.proj", "add_embedding.norm2": "text_pool.norm_out",
        "encoder_hid_proj": "context_proj", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0",
        "conv_out": "out.2"}


def is_if_unet_config(config: Mapping) -> bool:
    """Whether a diffusers UNet2DConditionModel config.json is an IF-style network (text-pooled, SimpleCrossAttn)."""
    blocks = list(config.get("down_block_types") or [])
    return config.get("addition_embed_type") == "text" or any(b in (DOWN_PLAIN, DOWN_ATTN) for b in blocks)


def if_config_from_diffusers(config: Mapping, *, learn_sigma: bool) -> IFUNetConfig:
    """IFUNetConfig from diffusers' `unet/config.json`; a setting IF's network does not have is a ConfigError."""
    def fail(what: str):
        raise ConfigError(f"unet/config.json: {what}; ldm's IF U-Net (IFUNet) cannot express it")

    for key, value in _FIXED.items():
        if key in config and config[key] != value and not (key == "resnet_out_scale_factor" and config[key] == 1):
            fail(f"{key}={config[key]!r} (IF uses {value!r})")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if any(b not in (DOWN_PLAIN, DOWN_ATTN) for b in down) or any(b not in (UP_PLAIN, UP_ATTN) for b in up):
        fail(f"down_block_types {down} / up_block_types {up} (IF has {DOWN_PLAIN}/{DOWN_ATTN} and {UP_PLAIN}/{UP_ATTN})")
    levels = [i for i, b in enumerate(down) if b == DOWN_ATTN]
    if [i for i, b in enumerate(reversed(up)) if b == UP_ATTN] != levels or len(up) != len(down):
        fail(f"up_block_types {up} do not mirror down_block_types {down}")
    if config.get("mid_block_type", MID) != MID:
        fail(f"mid_block_type={config.get('mid_block_type')!r} (IF has {MID})")
    if config.get("addition_embed_type") != "text":
        fail(f"addition_embed_type={config.get('addition_embed_type')!r} (IF pools the text: 'text')")
    if config.get("encoder_hid_dim") is None or config.get("encoder_hid_dim_type") not in (None, "text_proj"):
        fail("no encoder_hid_dim text projection (encoder_hid_dim_type 'text_proj')")
    if config.get("class_embed_type") not in (None, "timestep"):
        fail(f"class_embed_type={config.get('class_embed_type')!r} (IF-II embeds its noise level: 'timestep')")
    head_dim, cross_dim = config.get("attention_head_dim", 8), config.get("cross_attention_dim", 1280)
    if not isinstance(head_dim, int) or not isinstance(cross_dim, int):
        fail("per-level attention_head_dim / cross_attention_dim (IF has one of each)")
    act = config.get("act_fn", "silu")
    act = "silu" if act == "swish" else act
    out_channels = config.get("out_channels", 4)
    if learn_sigma and out_channels % 2:
        fail(f"out_channels={out_channels} with a learned variance (the scheduler's variance_type) needs an even count")
    try:
        return IFUNetConfig(
            in_channels=config.get("in_channels", 4), out_channels=out_channels // 2 if learn_sigma else out_channels,
            learn_sigma=learn_sigma, block_channels=tuple(config["block_out_channels"]),
            layers_per_block=config.get("layers_per_block", 2), attention_levels=tuple(levels),
            attention_head_dim=head_dim, context_dim=config["encoder_hid_dim"], cross_attention_dim=cross_dim,
            context_norm=config.get("cross_attention_norm"),
            text_pool_heads=config.get("addition_embed_type_num_heads", 64),
            time_embed_dim=config.get("time_embedding_dim"), time_embed_act=config.get("time_embedding_act_fn"),
            activation=act, aug_level_conditioning=config.get("class_embed_type") == "timestep",
            mid_block_scale=float(config.get("mid_block_scale_factor", 1.0)), norm_eps=config.get("norm_eps", 1e-5),
            dropout=config.get("dropout", 0.0), sample_size=config.get("sample_size"))
    except (ConfigError, TypeError) as e:
        fail(str(e))


def if_config_to_diffusers(c: IFUNetConfig) -> dict:
    """diffusers' `unet/config.json` for an IFUNetConfig (loads as UNet2DConditionModel)."""
    n = len(c.block_channels)
    down = [DOWN_ATTN if i in c.attention_levels else DOWN_PLAIN for i in range(n)]
    up = [UP_ATTN if i in c.attention_levels else UP_PLAIN for i in reversed(range(n))]
    layers = c.layers_per_block if isinstance(c.layers_per_block, int) else list(c.layers_per_block)
    return {"_class_name": "UNet2DConditionModel", **_FIXED, "act_fn": c.activation,
            "addition_embed_type": "text", "addition_embed_type_num_heads": c.text_pool_heads,
            "attention_head_dim": c.attention_head_dim, "block_out_channels": list(c.block_channels),
            "class_embed_type": "timestep" if c.aug_level_conditioning else None,
            "cross_attention_dim": c.cross_attention_dim, "cross_attention_norm": c.context_norm,
            "down_block_types": down, "dropout": c.dropout, "encoder_hid_dim": c.context_dim,
            "encoder_hid_dim_type": "text_proj", "in_channels": c.in_channels, "layers_per_block": layers,
            "mid_block_scale_factor": c.mid_block_scale, "mid_block_type": MID, "norm_eps": c.norm_eps,
            "out_channels": c.out_channels * (2 if c.learn_sigma else 1), "resnet_time_scale_shift": "scale_shift",
            "sample_size": c.sample_size, "time_embedding_act_fn": c.time_embed_act,
            "time_embedding_dim": c.time_embed_dim, "up_block_types": up}


def _module_pairs(c: IFUNetConfig) -> list[tuple[str, str, dict]]:
    """(native module prefix, diffusers module prefix, leaf renames) for every block, in ADM order."""
    pairs = [(native, diffusers, {}) for diffusers, native in _TOP.items()]
    k, last = 1, len(c.block_channels) - 1
    for level in range(len(c.block_channels)):
        for j in range(c.blocks_per_level[level]):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", _RES))
            if level in c.attention_levels:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", _ATTN))
            k += 1
        if level != last:
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", _RES))
            k += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", _RES), ("middle_block.1", "mid_block.attentions.0", _ATTN),
              ("middle_block.2", "mid_block.resnets.1", _RES)]
    k = 0
    for i, level in enumerate(reversed(range(len(c.block_channels)))):
        attn = level in c.attention_levels
        for j in range(c.blocks_per_level[level] + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", _RES))
            if attn:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", _ATTN))
            if level and j == c.blocks_per_level[level]:
                pairs.append((f"output_blocks.{k}.{2 if attn else 1}", f"up_blocks.{i}.upsamplers.0", _RES))
            k += 1
    return pairs


def native_to_diffusers_names(c: IFUNetConfig) -> dict[str, str]:
    """Every native key of the network `c` describes -> its diffusers key."""
    with torch.device("meta"):
        native_keys = list(IFUNet(c).state_dict())
    pairs = sorted(_module_pairs(c), key=lambda p: -len(p[0]))  # the longest prefix first
    names = {}
    for key in native_keys:
        for native, diffusers, leaves in pairs:
            if key.startswith(native + "."):
                rest = key[len(native) + 1:]
                leaf = next((d for d, n in leaves.items() if rest.startswith(n + ".")), None)
                names[key] = f"{diffusers}.{leaf}{rest[len(leaves[leaf]):]}" if leaf else f"{diffusers}.{rest}"
                break
        else:  # every native module has a pair: a key without one is a bug in the table above
            raise AssertionError(f"IF key map: no diffusers name for {key}")
    return names


def _rename(sd: Mapping[str, torch.Tensor], names: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    unplaced = [k for k in sd if k not in names]
    missing = [k for k in names if k not in sd]
    if unplaced or missing:
        raise CheckpointError(f"{what}: the weights do not fit the IF U-Net its config describes; keys it could not "
                              f"place: {unplaced[:5]}{' ...' if len(unplaced) > 5 else ''}; keys missing: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {names[k]: v for k, v in sd.items()}


def if_unet_diffusers_to_native(sd: Mapping[str, torch.Tensor], c: IFUNetConfig) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel weights -> IFUNet's native keys (the same tensors)."""
    return _rename(sd, {d: n for n, d in native_to_diffusers_names(c).items()}, "diffusers IF U-Net")


def if_unet_native_to_diffusers(sd: Mapping[str, torch.Tensor], c: IFUNetConfig) -> dict[str, torch.Tensor]:
    """IFUNet's native weights -> diffusers UNet2DConditionModel keys (the same tensors)."""
    return _rename(sd, native_to_diffusers_names(c), "native IF U-Net")


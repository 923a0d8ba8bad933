"""U-Net key maps between CompVis/Stability (native) and diffusers' UNet2DConditionModel, and config translation."""
from __future__ import annotations

from ldm.errors import CheckpointError, ConfigError
from ldm.models.micro_conditioning import SDXL_BASE
from ldm.models.unet import UNetConfig

# ResBlock sub-module names: CompVis -> diffusers ResnetBlock2D
_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _module_map(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """(original prefix, diffusers prefix, is_resblock) for every sub-module of the U-Net described by `config`."""
    c = config
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
    ]
    if c.num_classes is not None:
        pairs.append(("label_emb", "class_embedding", False))
    elif c.adm_in_channels is not None:
        mlp = "add_embedding" if c.micro_conditioning else "class_embedding"  # SDXL's is diffusers' text_time
        pairs += [("label_emb.0.0", f"{mlp}.linear_1", False), ("label_emb.0.2", f"{mlp}.linear_2", False)]

    levels = len(c.channel_mult)
    index, ds = 1, 1
    for level in range(levels):
        attn = ds in c.attention_resolutions
        for j in range(c.num_res_blocks):
            pairs.append((f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", True))
            if attn:
                pairs.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", False))
            index += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv", False))
            index, ds = index + 1, ds * 2

    pairs += [("middle_block.0", "mid_block.resnets.0", True),
              ("middle_block.1", "mid_block.attentions.0", False),
              ("middle_block.2", "mid_block.resnets.1", True)]

    index = 0
    for up, level in enumerate(reversed(range(levels))):
        attn = ds in c.attention_resolutions
        for j in range(c.num_res_blocks + 1):
            pairs.append((f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}", True))
            if attn:
                pairs.append((f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{j}", False))
            if level and j == c.num_res_blocks:
                upsample = f"output_blocks.{index}.{2 if attn else 1}.conv"  # after the transformer, if any
                pairs.append((upsample, f"up_blocks.{up}.upsamplers.0.conv", False))
                ds //= 2
            index += 1
    return pairs


def _convert(sd: dict, pairs: list[tuple[str, str, dict[str, str]]], direction: str) -> dict:
    by_prefix = {src: (dst, parts) for src, dst, parts in pairs}
    out, unknown = {}, []
    for key, value in sd.items():
        head = key
        while head and head not in by_prefix:  # longest module prefix first
            head = head.rpartition(".")[0]
        if not head:
            unknown.append(key)
            continue
        dst, parts = by_prefix[head]
        rest = key[len(head) + 1:]
        for old, new in parts.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[f"{dst}.{rest}" if rest else dst] = value
    if unknown:
        raise CheckpointError(f"U-Net {direction}: {len(unknown)} key(s) do not belong to the configured architecture, "
                              f"first ones {unknown[:5]}; check the U-Net config (channel_mult, num_res_blocks, "
                              "attention_resolutions, num_classes/adm_in_channels)")
    return out


def unet_original_to_diffusers(sd: dict, config: UNetConfig) -> dict:
    """Rename native (CompVis, without `model.diffusion_model.`) U-Net keys to diffusers' UNet2DConditionModel keys."""
    pairs = [(o, d, _RESNET_PARTS if res else {}) for o, d, res in _module_map(config)]
    return _convert(sd, pairs, "original -> diffusers")


def unet_diffusers_to_original(sd: dict, config: UNetConfig) -> dict:
    """Rename diffusers' UNet2DConditionModel keys to native (CompVis) U-Net keys."""
    inverse = {v: k for k, v in _RESNET_PARTS.items()}
    pairs = [(d, o, inverse if res else {}) for o, d, res in _module_map(config)]
    return _convert(sd, pairs, "diffusers -> original")


# diffusers settings our U-Net does not implement: key -> the only value we accept
_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_attention_heads": None, "dual_cross_attention": False,
    "mid_block_only_cross_attention": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "class_embeddings_concat": False, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "attention_type": "default",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


def _only_cross_attention_from_diffusers(cfg: dict, levels: int) -> tuple[bool, ...] | None:
    """diffusers' `only_cross_attention` (one bool, or one per down block) as CompVis' `disable_self_attentions`.

    diffusers' UNetMidBlock2DCrossAttn always keeps its self-attention (its mid_block_only_cross_attention only acts
    on the SimpleCrossAttn mid block), so the middle block maps to disable_middle_self_attn=False.
    """
    value = cfg.get("only_cross_attention", False)
    if isinstance(value, bool):
        return (value,) * levels if value else None
    value = tuple(bool(v) for v in value)
    if len(value) != levels:
        raise ConfigError(f"U-Net config: only_cross_attention {list(value)} needs one entry per down block ({levels})")
    return value if any(value) else None


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """A `config.json` dict for diffusers' UNet2DConditionModel with the same architecture and weights layout."""
    c = config
    if c.context_dim is None:
        raise ConfigError("UNetConfig.context_dim=None (no cross-attention) has no diffusers UNet2DConditionModel form")
    if not c.conv_resample:
        raise ConfigError("UNetConfig.conv_resample=False has no diffusers UNet2DConditionModel form")
    if c.disable_middle_self_attn:
        raise ConfigError("UNetConfig.disable_middle_self_attn=True has no diffusers UNet2DConditionModel form (its "
                          "cross-attention mid block always keeps self-attention)")
    levels = len(c.channel_mult)
    channels = [c.model_channels * m for m in c.channel_mult]
    attn = [2 ** level in c.attention_resolutions for level in range(levels)]
    # diffusers' `attention_head_dim` is really the number of heads (a historic misnomer)
    heads = [c.heads_for(ch)[0] for ch in channels]
    out = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels * (2 if c.learn_sigma else 1),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": channels,
        "layers_per_block": c.num_res_blocks,
        "cross_attention_dim": c.context_dim,
        "attention_head_dim": c.num_heads if c.num_head_channels == -1 else heads,
        "use_linear_projection": c.use_linear_in_transformer,
        "transformer_layers_per_block": c.transformer_depth if isinstance(c.transformer_depth, int)
        else list(c.transformer_depth),
        "class_embed_type": "projection" if c.adm_in_channels is not None else None,
        "projection_class_embeddings_input_dim": c.adm_in_channels,
        "num_class_embeds": c.num_classes,
        "dropout": c.dropout,
        "upcast_attention": False,
    }
    if c.sample_size is not None:
        out["sample_size"] = c.sample_size
    out.update(_FIXED)
    out["only_cross_attention"] = list(c.disable_self_attentions) if c.disable_self_attentions else False
    if c.micro_conditioning:  # SDXL: pooled text + embedded sizes through add_embedding
        out.update(class_embed_type=None, addition_embed_type="text_time",
                   addition_time_embed_dim=c.micro_conditioning_dim)
    return out


def unet_config_from_diffusers(cfg: dict, learn_sigma: bool = False,
                               micro_conditioning: tuple[str, ...] = SDXL_BASE) -> UNetConfig:
    """Our UNetConfig from a diffusers UNet2DConditionModel `config.json` dict.

    diffusers' U-Net config does not say whether the extra output channels are a learned variance; pass
    `learn_sigma=True` (e.g. when the scheduler's variance_type is "learned_range") to halve `out_channels`.
    Nor does an SDXL (`addition_embed_type: text_time`) config name its numbers: `micro_conditioning` does (the
    base model's by default; the refiner's pipeline says `requires_aesthetics_score`).
    """
    name = cfg.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ConfigError(f"U-Net config: expected a diffusers UNet2DConditionModel config, got {name!r}")
    text_time = cfg.get("addition_embed_type") == "text_time"
    if text_time and not cfg.get("projection_class_embeddings_input_dim"):
        raise ConfigError("U-Net config: addition_embed_type='text_time' needs projection_class_embeddings_input_dim")
    for key, allowed in _FIXED.items():
        if text_time and key in ("addition_embed_type", "addition_time_embed_dim"):
            continue
        value = cfg.get(key, allowed)
        if value != allowed and not (key == "mid_block_only_cross_attention" and isinstance(value, bool)):
            raise ConfigError(f"U-Net config: {key}={value!r} is not supported (only {allowed!r})")
    if cfg.get("class_embed_type") not in (None, "projection"):
        raise ConfigError(f"U-Net config: class_embed_type={cfg['class_embed_type']!r} is not supported "
                          "(None or 'projection')")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    if set(down + up) - known or ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)] != up:
        raise ConfigError(f"U-Net config: block types {down} / {up} are not a CompVis U-Net layout")
    channels = list(cfg["block_out_channels"])
    model_channels = channels[0]
    if any(ch % model_channels for ch in channels):
        raise ConfigError(f"U-Net config: block_out_channels {channels} are not multiples of the first")
    context_dim = cfg.get("cross_attention_dim", 1280)
    if isinstance(context_dim, (list, tuple)):
        if len(set(context_dim)) != 1:
            raise ConfigError(f"U-Net config: per-block cross_attention_dim {context_dim} is not supported")
        context_dim = context_dim[0]

    heads = cfg.get("attention_head_dim", 8)  # diffusers' name for the number of heads
    if isinstance(heads, int):
        num_heads, num_head_channels = heads, -1
    else:
        widths = {ch // h for ch, h in zip(channels, heads)}
        if len(set(heads)) == 1:
            num_heads, num_head_channels = heads[0], -1
        elif len(widths) == 1 and all(ch % h == 0 for ch, h in zip(channels, heads)):
            num_heads, num_head_channels = -1, widths.pop()
        else:
            raise ConfigError(f"U-Net config: attention_head_dim {heads} is neither a fixed head count nor a fixed "
                              "head width")
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, int) else tuple(depth)
    if not isinstance(depth, int) and len(set(depth)) == 1:
        depth = depth[0]
    out_channels = cfg.get("out_channels", 4)
    if learn_sigma:
        if out_channels % 2:
            raise ConfigError(f"U-Net config: learn_sigma needs an even out_channels, got {out_channels}")
        out_channels //= 2
    projection = cfg.get("class_embed_type") == "projection" or text_time
    no_self_attention = _only_cross_attention_from_diffusers(cfg, len(channels))
    micro = dict(micro_conditioning=tuple(micro_conditioning),
                 micro_conditioning_dim=cfg.get("addition_time_embed_dim") or 256) if text_time else {}
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=out_channels,
        model_channels=model_channels,
        attention_resolutions=tuple(2**level for level in reversed(range(len(attn))) if attn[level]),  # as (4, 2, 1)
        num_res_blocks=cfg.get("layers_per_block", 2),
        channel_mult=tuple(ch // model_channels for ch in channels),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        num_classes=cfg.get("num_class_embeds"),
        adm_in_channels=cfg.get("projection_class_embeddings_input_dim") if projection else None,
        learn_sigma=learn_sigma,
        dropout=float(cfg.get("dropout", 0.0)),
        sample_size=cfg.get("sample_size"),
        disable_self_attentions=no_self_attention,
        **micro,
    )

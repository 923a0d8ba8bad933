"""Autoencoder key maps CompVis (original / native) <-> diffusers `AutoencoderKL`, and config translation."""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from ldm.errors import CheckpointError, ConfigError
from ldm.models.autoencoder import AutoencoderConfig

# Mid-block attention sub-modules: CompVis (1x1 conv) name -> diffusers (Linear) name.
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_NAMES_INV = {v: k for k, v in _ATTN_NAMES.items()}


def _check_representable(config: AutoencoderConfig) -> None:
    if config.attn_resolutions:
        raise ConfigError(f"AutoencoderConfig.attn_resolutions={tuple(config.attn_resolutions)}: diffusers' "
                          "AutoencoderKL has no attention outside the mid block; use attn_resolutions=()")
    if config.z_channels != config.embed_dim or not config.double_z:
        raise ConfigError("diffusers' AutoencoderKL needs z_channels == embed_dim and double_z=True, got "
                          f"z_channels={config.z_channels}, embed_dim={config.embed_dim}, double_z={config.double_z}")


def _resnet_to_diffusers(rest: str) -> str:
    return rest.replace("nin_shortcut", "conv_shortcut", 1)


def _resnet_to_original(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut", 1)


def _original_key_to_diffusers(key: str, levels: int) -> str | None:
    part, _, rest = key.partition(".")
    if key.split(".")[0] in {"quant_conv", "post_quant_conv"}:
        return key
    if part not in ("encoder", "decoder"):
        return None
    if (m := re.fullmatch(r"(conv_in|conv_out|norm_out)\.(.+)", rest)):
        name = "conv_norm_out" if m[1] == "norm_out" else m[1]
        return f"{part}.{name}.{m[2]}"
    if (m := re.fullmatch(r"mid\.block_([12])\.(.+)", rest)):
        return f"{part}.mid_block.resnets.{int(m[1]) - 1}.{_resnet_to_diffusers(m[2])}"
    if (m := re.fullmatch(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", rest)):
        return f"{part}.mid_block.attentions.0.{_ATTN_NAMES[m[1]]}.{m[2]}"
    if (m := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(.+)", rest)) and part == "encoder":
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_to_diffusers(m[3])}"
    if (m := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(.+)", rest)) and part == "encoder":
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    # CompVis numbers decoder levels from the highest resolution (up.0 runs last); diffusers in run order.
    if (m := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(.+)", rest)) and part == "decoder":
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_resnet_to_diffusers(m[3])}"
    if (m := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(.+)", rest)) and part == "decoder":
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    return None


def _diffusers_key_to_original(key: str, levels: int) -> str | None:
    part, _, rest = key.partition(".")
    if key.split(".")[0] in {"quant_conv", "post_quant_conv"}:
        return key
    if part not in ("encoder", "decoder"):
        return None
    if (m := re.fullmatch(r"(conv_in|conv_out|conv_norm_out)\.(.+)", rest)):
        name = "norm_out" if m[1] == "conv_norm_out" else m[1]
        return f"{part}.{name}.{m[2]}"
    if (m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest)):
        return f"{part}.mid.block_{int(m[1]) + 1}.{_resnet_to_original(m[2])}"
    if (m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", rest)):
        return f"{part}.mid.attn_1.{_ATTN_NAMES_INV[m[1]]}.{m[2]}"
    if (m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)) and part == "encoder":
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet_to_original(m[3])}"
    if (m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest)) and part == "encoder":
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if (m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)) and part == "decoder":
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_resnet_to_original(m[3])}"
    if (m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest)) and part == "decoder":
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return None


def _convert(sd: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], reshape: Callable,
             direction: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in sd.items():
        new = rename(key)
        if new is None:
            unknown.append(key)
            continue
        out[new] = reshape(new, value)
    if unknown:
        raise CheckpointError(f"autoencoder {direction}: {len(unknown)} key(s) have no mapping, first: "
                              f"{unknown[:5]} (a VAE with attention outside the mid block, or not a KL VAE?)")
    return out


def vae_original_to_diffusers(sd: Mapping[str, torch.Tensor], config: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """CompVis keys (prefix `first_stage_model.` already stripped) -> diffusers `AutoencoderKL` keys."""
    _check_representable(config)
    levels = len(config.ch_mult)

    def reshape(new_key: str, value: torch.Tensor) -> torch.Tensor:
        # diffusers holds the mid-attention projections as Linear: `o i 1 1 -> o i`
        if ".attentions.0.to_" in new_key and new_key.endswith(".weight") and value.ndim == 4:
            return value[:, :, 0, 0]
        return value

    return _convert(sd, lambda k: _original_key_to_diffusers(k, levels), reshape, "original -> diffusers")


def vae_diffusers_to_original(sd: Mapping[str, torch.Tensor], config: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` keys -> CompVis keys (without `first_stage_model.`)."""
    _check_representable(config)
    levels = len(config.ch_mult)

    def reshape(new_key: str, value: torch.Tensor) -> torch.Tensor:
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", new_key) and value.ndim == 2:
            return value[:, :, None, None]  # `o i -> o i 1 1`
        return value

    return _convert(sd, lambda k: _diffusers_key_to_original(k, levels), reshape, "diffusers -> original")


_IGNORED_DIFFUSERS_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "force_upcast", "down_block_types",
                           "up_block_types", "act_fn", "use_quant_conv", "use_post_quant_conv",
                           "mid_block_add_attention", "latents_mean", "latents_std"}


def vae_config_from_diffusers(cfg: Mapping) -> AutoencoderConfig:
    """diffusers `AutoencoderKL` config.json dict -> AutoencoderConfig."""
    checks = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
    for key, want in checks.items():
        if cfg.get(key, want) != want:
            raise ConfigError(f"diffusers VAE config: {key}={cfg[key]!r} is not supported (need {want!r})")
    if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
        raise ConfigError("diffusers VAE config: per-channel latents_mean/latents_std are not supported; "
                          "only scaling_factor and shift_factor")
    for key in ("down_block_types", "up_block_types"):
        kinds = set(cfg.get(key) or [])
        if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise ConfigError(f"diffusers VAE config: {key}={cfg[key]} is not supported")
    known = {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
             "norm_num_groups", "sample_size", "scaling_factor", "shift_factor"} | _IGNORED_DIFFUSERS_KEYS
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"diffusers VAE config: unknown key(s) {unknown}")
    channels = list(cfg.get("block_out_channels", (64,)))
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ConfigError(f"diffusers VAE config: block_out_channels={channels} are not multiples of the first")
    size = cfg.get("sample_size", 32)
    latent = cfg.get("latent_channels", 4)
    return AutoencoderConfig(
        in_channels=cfg.get("in_channels", 3), out_ch=cfg.get("out_channels", 3), ch=ch,
        ch_mult=tuple(c // ch for c in channels), num_res_blocks=cfg.get("layers_per_block", 1),
        attn_resolutions=(), z_channels=latent, embed_dim=latent, double_z=True,
        resolution=int(size[0] if isinstance(size, (list, tuple)) else size),
        scale_factor=float(cfg.get("scaling_factor", AutoencoderConfig.scale_factor)),
        shift_factor=float(cfg.get("shift_factor") or 0.0), norm_groups=cfg.get("norm_num_groups", 32))


def vae_config_to_diffusers(config: AutoencoderConfig) -> dict:
    """AutoencoderConfig -> diffusers `AutoencoderKL` config.json dict."""
    _check_representable(config)
    levels = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.embed_dim,
        "norm_num_groups": config.norm_groups,
        "sample_size": config.resolution,
        "scaling_factor": config.scale_factor,
        "shift_factor": config.shift_factor or None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }

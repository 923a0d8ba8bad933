"""FSDP2 through accelerate: the wrap units, the EMA's sharded checkpoint files, and the full export of sharded weights.

The accelerate config alone chooses DDP or FSDP (`distributed_type: FSDP`, `fsdp_version: 2`: configs/accelerate/).
Under FSDP2 the trained module's parameters are DTensors, each rank holding a slice:
- The wrap units are the U-Net itself and its ResBlock / SpatialTransformer blocks (and a trained text encoder): each
  gathers its weights just before it runs and frees them after. The U-Net and the text encoder being units lets the
  previews call them outside the training forward.
  The frozen autoencoder and text encoders are not part of the trained module, so they stay unwrapped.
- The EMA is built on the sharded parameters, so its shadow is sharded the same way; a checkpoint holds one
  `ema-rank-R-of-W.safetensors` per rank (its local slices), beside accelerate's sharded model and optimizer.
- The export gathers one tensor at a time onto rank 0's CPU and loads it into an unsharded copy of the network
  built from its config: no GPU ever holds the whole model.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.errors import CheckpointError, ConfigError
from ldm.io.part_types import build_part

# The classes FSDP wraps as units, where the model has them (EfficientUNet reuses the same blocks).
WRAP_UNITS = ("UNetModel", "EfficientUNet", "ResBlock", "SpatialTransformer")


def is_sharded(accelerator) -> bool:
    """Whether the trained module is sharded (FSDP); refuses FSDP1 and non-sharded checkpoints with the way out."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ConfigError(f"the accelerate config asks for FSDP version {plugin.fsdp_version}; ldm trains under FSDP2 "
                          "only: set `fsdp_version: 2` in its fsdp_config (configs/accelerate/fsdp2.yaml)")
    state_dict_type = str(getattr(plugin.state_dict_type, "name", plugin.state_dict_type))
    if state_dict_type != "SHARDED_STATE_DICT":
        raise ConfigError(f"the accelerate config sets fsdp_state_dict_type {state_dict_type}; ldm's checkpoints are "
                          "sharded (the final export is the full model): set `fsdp_state_dict_type: SHARDED_STATE_DICT`")
    return True


def set_wrap_units(accelerator, module: nn.Module) -> list[str]:
    """Make the U-Net, its residual and transformer blocks (and a trained text encoder) the FSDP units of the
    training objective `module`, before `prepare`; returns their class names."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    present = {type(m).__name__ for m in module.modules()}
    units = [name for name in WRAP_UNITS if name in present]
    if getattr(module, "text_encoder", None) is not None:  # a trained text encoder: previews call it directly too
        units.append(type(module.text_encoder).__name__)
    others = sorted(set(plugin.transformer_cls_names_to_wrap or ()) - set(WRAP_UNITS))
    if others:
        warnings.warn(f"fsdp_transformer_layer_cls_to_wrap names {others} in the accelerate config; ldm wraps "
                      f"{units} instead", stacklevel=2)
    plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = transformer_auto_wrap_policy, units
    policy = plugin.mixed_precision_policy
    if policy is not None and policy.reduce_dtype not in (None, torch.float32):
        # Gradients are averaged in float32, as under DDP (docs/multi-gpu.md); the compute dtype stays accelerate's.
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype,
                                                             reduce_dtype=torch.float32,
                                                             output_dtype=policy.output_dtype)
    return units


def full_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of possibly sharded ones, gathered one at a time; a collective: every rank calls it, and
    only the ranks with `keep` get the result (an empty dict elsewhere)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in tensors.items():
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = whole.detach().to("cpu", copy=True)
    return out


def unsharded_copy(module: nn.Module, config, keep: bool) -> nn.Module | None:
    """A plain CPU copy of a sharded network (built from its `config`, loaded with the gathered weights) on the
    ranks with `keep`; None elsewhere. A collective."""
    state = full_tensors(module.state_dict(), keep)
    if not keep:
        return None
    copy = build_part(config)
    copy.load_state_dict(state)
    return copy


def ema_file(rank: int, world: int) -> str:
    """The name of one rank's slice of the EMA in a sharded checkpoint."""
    return f"ema-rank-{rank}-of-{world}.safetensors"


def save_sharded_ema(ema, folder: Path, rank: int, world: int) -> None:
    """Write this rank's slices of the EMA shadow (and the update count) into `folder`."""
    from torch.distributed.tensor import DTensor

    state = {k: (v.to_local() if isinstance(v, DTensor) else v).contiguous().cpu() for k, v in ema.state_dict().items()}
    save_file(state, str(Path(folder) / ema_file(rank, world)))


def load_sharded_ema(ema, folder: Path, rank: int, world: int) -> None:
    """Restore this rank's slices of the EMA shadow from `folder` (a checkpoint written on as many ranks)."""
    from torch.distributed.tensor import DTensor

    path = Path(folder) / ema_file(rank, world)
    if not path.is_file():
        found = sorted(p.name for p in Path(folder).glob("ema*.safetensors"))
        raise CheckpointError(f"{path} is missing (found {found or 'no EMA files'}): a sharded EMA resumes on the "
                              f"same number of processes it was saved from ({world} here)")
    state = load_file(str(path))
    expected = {f"shadow.{n}" for n in ema.shadow} | {"num_updates"}
    if set(state) != expected:
        raise CheckpointError(f"{path} does not match the model's EMA (differing names: "
                              f"{sorted(set(state) ^ expected)[:5]})")
    for name, target in ema.shadow.items():
        local = target.to_local() if isinstance(target, DTensor) else target
        if state[f"shadow.{name}"].shape != local.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(state[f'shadow.{name}'].shape)}, this rank's "
                                  f"slice {tuple(local.shape)}; resume with the sharding it was saved with")
        local.copy_(state[f"shadow.{name}"])
    ema.num_updates = int(state["num_updates"])


def unsharded_parts(parts, keep: bool):
    """The training parts with whole CPU copies of the sharded networks (the U-Net, a trained text encoder) on the
    ranks with `keep`, for the export; None elsewhere. A collective."""
    from torch.distributed.tensor import DTensor

    def whole(module, config):
        sharded = any(isinstance(p, DTensor) for p in module.parameters())
        return unsharded_copy(module, config, keep) if sharded else module

    unet, text_encoder = whole(parts.unet, parts.unet.config), whole(parts.text_encoder, parts.text_encoder_config)
    return dataclasses.replace(parts, unet=unet, text_encoder=text_encoder) if keep else None


def finish_wrapping(module: nn.Module) -> str:
    """After `prepare`: a trained text encoder gathers its weights in `encode` too (it is called by that name, not
    through forward); returns the units by class, e.g. `DiffusionObjective 1, UNetModel 1, ResBlock 8, ...`."""
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    text_encoder = getattr(module, "text_encoder", None)
    if isinstance(text_encoder, FSDPModule):
        register_fsdp_forward_method(text_encoder, "encode")
    counts = Counter(type(m).__name__.removeprefix("FSDP") for m in module.modules() if isinstance(m, FSDPModule))
    return ", ".join(f"{name} {n}" for name, n in counts.items())

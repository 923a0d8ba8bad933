"""Conditioning helpers: text embeddings as network arguments, and channels concatenated to the network's input.

A `cond` dict holds the network's keyword arguments; under classifier-free guidance it is
`{"cond": {...}, "uncond": {...}}` (`ldm.diffusion.guidance.cfg`). Nothing here imports a network.
"""
from __future__ import annotations

import torch
from torch import nn


def takes_pooled_text(network_config) -> bool:
    """Whether a network takes the pooled text embedding as `y` (an ADM-style label embedding: SDXL, unCLIP)."""
    return getattr(network_config, "adm_in_channels", None) is not None


def text_conditioning(embeddings, *, pooled: bool) -> dict[str, torch.Tensor]:
    """TextEmbeddings -> network arguments: `context`, its `context_mask`, and the pooled `y` when `pooled`.

    The mask is always passed: T5 needs it (padding is not attended), and CLIP's is all True, which changes nothing.
    """
    cond = {"context": embeddings.tokens, "context_mask": embeddings.mask}
    if pooled and embeddings.pooled is not None:
        cond["y"] = embeddings.pooled
    return cond


def drop_full_masks(cond: dict) -> dict:
    """`cond` with `context_mask` set to None in every half when each mask in it is all True (CLIP's always is).

    Attention over an all-True mask is attention without one, but a mask rules out the flash kernel and costs a
    broadcast per cross-attention, every step; checked once per generation call (one device sync, before the loop).
    """
    guided = "cond" in cond and "uncond" in cond
    halves = [h for h in ((cond["cond"], cond["uncond"]) if guided else (cond,)) if h]
    masks = [h.get("context_mask") for h in halves]
    if not masks or any(m is None for m in masks) or not all(bool(m.all()) for m in masks):
        return cond
    strip = lambda half: {**half, "context_mask": None} if half else half  # noqa: E731
    return {**cond, "cond": strip(cond["cond"]), "uncond": strip(cond["uncond"])} if guided else strip(cond)


def add_conditioning(cond: dict, **extra: torch.Tensor) -> dict:
    """`cond` with `extra` arguments added to both halves under guidance (the same tensors: e.g. an inpainting mask)."""
    if "cond" in cond and "uncond" in cond:
        return {"cond": {**cond["cond"], **extra}, "uncond": {**cond["uncond"], **extra}}
    return {**cond, **extra}


class ConcatNetwork(nn.Module):
    """Feeds `concat` channels beside x: the inpainting mask and masked-image latents (SD's 9-channel U-Net), a
    low-resolution image for super-resolution. `network(cat([x, concat]), t, **rest)`, as diffusers does."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, t: torch.Tensor, concat: torch.Tensor | None = None, **kwargs):
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        return self.network(x, t, **kwargs)

"""Fused self-attention projections: one q|k|v matrix product instead of three, with the key layout unchanged.

`fuse_qkv(model)` gives every self-attention-capable `CrossAttention` a `qkv_weight` (3 inner x dim) buffer and
makes `to_q.weight`, `to_k.weight` and `to_v.weight` views into it: state_dict keys and values stay those of the
unfused model (the buffer is not persistent), and loading a checkpoint, an EMA swap or an optimizer step writes
through the views into the fused matrix. The fused product runs only without autograd on the weights (inference):
training keeps the three Linear layers, so gradients reach the parameters as before. GEGLU's two projections are
already one matrix (`GEGLU.proj`).
"""
from __future__ import annotations

import torch
from torch import nn


def _can_fuse(attention: nn.Module) -> bool:
    q, k, v = attention.to_q, attention.to_k, attention.to_v
    return (q.bias is None and k.bias is None and v.bias is None
            and q.in_features == k.in_features == v.in_features)


def share_qkv(attention: nn.Module) -> None:
    """Rebuild `attention.qkv_weight` from its q, k, v weights and make those views into it (storage shared)."""
    q, k, v = attention.to_q.weight, attention.to_k.weight, attention.to_v.weight
    with torch.no_grad():
        fused = torch.cat([q, k, v])
        rows = q.shape[0]
        for i, weight in enumerate((q, k, v)):
            weight.data = fused[i * rows:(i + 1) * rows]
    attention.qkv_weight = fused


def fuse_qkv(model: nn.Module) -> int:
    """Fuse the q, k, v projections of every attention layer in `model` that can be (no biases, same input width).

    Returns how many layers were fused. A layer used for cross-attention (context given) keeps its three products.
    """
    count = 0
    for name, module in model.named_modules():
        if name.endswith("attn2"):  # the transformer blocks' cross-attention always has a context
            continue
        if getattr(module, "qkv_weight", 0) is None and hasattr(module, "to_q") and _can_fuse(module):
            share_qkv(module)
            count += 1
    return count


def unfuse_qkv(model: nn.Module) -> None:
    """Undo `fuse_qkv`: every weight gets its own storage again and the fused buffers are dropped."""
    for module in model.modules():
        if getattr(module, "qkv_weight", None) is not None:
            module.qkv_weight = None
            for linear in (module.to_q, module.to_k, module.to_v):
                linear.weight.data = linear.weight.data.clone()

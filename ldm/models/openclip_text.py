"""open_clip's CLIP text tower (Radford et al. 2021; Cherti et al. 2023) with open_clip's state-dict keys.

The bundled model and SD-2's text encoder are this tower. Building it here, instead of through open_clip, spares a
model load the import of open_clip (which imports torchvision and transformers: ~2.4 s of a 2.8 s cold load of the
bundled model). `OpenCLIPTextEncoder` takes either this tower or an open_clip `CLIP`; the weights are the same
tensors under the same names, so files move freely between the two. Configs this tower does not cover (named open_clip
architectures, layer scale, other pooling or projection types) are still built by open_clip.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# The text_cfg keys of an open_clip model config this tower implements; any other key sends the build to open_clip.
TEXT_CFG_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def fits_tower(model_cfg: dict) -> bool:
    """Whether an open_clip model config (`embed_dim`, `text_cfg`[, `quick_gelu`, `vision_cfg`]) is this tower's."""
    text_cfg = model_cfg.get("text_cfg")
    return (isinstance(text_cfg, dict) and "name" not in model_cfg and set(text_cfg) <= TEXT_CFG_KEYS
            and set(model_cfg) <= {"embed_dim", "text_cfg", "quick_gelu", "vision_cfg"})


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps the input's dtype (open_clip's, for half-precision inputs under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); keys `ln_1`, `attn`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=QuickGELU() if quick_gelu else nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The blocks at `resblocks` (batch first, as open_clip's), so `transformer.resblocks.{i}.*` keys match."""

    batch_first = True

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers))


class OpenCLIPTextTower(nn.Module):
    """Token and position embeddings, causal transformer, final LayerNorm, text projection, and CLIP's logit scale."""

    def __init__(self, embed_dim: int, context_length: int = 77, vocab_size: int = 49408, width: int = 512,
                 heads: int = 8, layers: int = 12, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # kept: open_clip files carry it
        causal = torch.full((context_length, context_length), float("-inf")).triu_(1)  # additive: -inf above the diagonal
        self.register_buffer("attn_mask", causal, persistent=False)
        self._init_weights(width, layers)

    @classmethod
    def from_config(cls, model_cfg: dict) -> "OpenCLIPTextTower":
        """From an open_clip model config: `embed_dim`, `text_cfg` (TEXT_CFG_KEYS) and `quick_gelu`."""
        return cls(model_cfg.get("embed_dim", 512), **model_cfg["text_cfg"], quick_gelu=model_cfg.get("quick_gelu", False))

    @torch.no_grad()
    def _init_weights(self, width: int, layers: int) -> None:
        # CLIP's initialisation (Radford et al. 2021, as open_clip): residual projections scaled by the depth.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

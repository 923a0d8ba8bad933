"""Zero-shot retrieval between paired image and text embeddings: top-k accuracy both ways (CLIP, Radford et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.errors import LdmError


def retrieval_accuracy(img_emb: torch.Tensor, txt_emb: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Row i of each is one pair: the fraction of texts whose image ranks in the top k among all images (t2i), and
    of images whose text does (i2t), by cosine similarity; ties count against the right answer."""
    if img_emb.shape != txt_emb.shape or img_emb.ndim != 2:
        raise LdmError(f"retrieval needs paired `n d` embeddings, got {tuple(img_emb.shape)} and {tuple(txt_emb.shape)}")
    sim = F.normalize(img_emb.double(), dim=-1) @ F.normalize(txt_emb.double(), dim=-1).T  # images x texts
    right = sim.diagonal()
    # Rank = how many candidates score at least as high as the right one (itself included).
    rank_i2t = (sim >= right[:, None]).sum(dim=1)
    rank_t2i = (sim >= right[None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"t2i_top{k}"] = float((rank_t2i <= k).double().mean())
        out[f"i2t_top{k}"] = float((rank_i2t <= k).double().mean())
    return out


def prompt_retrieval(img_emb: torch.Tensor, prompt_emb: torch.Tensor, index: torch.Tensor,
                     ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Images generated from prompts `index[i]` among `m` candidate prompts: the fraction whose own prompt ranks top k."""
    if index.shape != (img_emb.shape[0],) or img_emb.shape[1] != prompt_emb.shape[1]:
        raise LdmError("prompt_retrieval needs `n d` images, `m d` prompts and an `n` index into the prompts")
    sim = F.normalize(img_emb.double(), dim=-1) @ F.normalize(prompt_emb.double(), dim=-1).T  # n x m
    right = sim.gather(1, index[:, None].long())
    rank = (sim >= right).sum(dim=1)
    return {f"top{k}": float((rank <= k).double().mean()) for k in ks}

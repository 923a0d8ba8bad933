"""Zero-shot retrieval between paired image and text embeddings: top-k accuracy both ways (CLIP, Radford et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.errors import LdmError


def caption_groups(captions: list[str]) -> torch.Tensor:
    """`n` group ids: rows whose captions are the same string share one (the first such row's index)."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(c, i) for i, c in enumerate(captions)], dtype=torch.long)


def retrieval_accuracy(img_emb: torch.Tensor, txt_emb: torch.Tensor, ks: tuple[int, ...] = (1, 5), *,
                       captions: list[str] | None) -> dict[str, float]:
    """Row i of each is one pair: the fraction of texts with a right image in the top k among all images (t2i), and
    of images with a right text there (i2t), by cosine similarity.

    The right answers of row i are its own pair and every row whose caption is the same string (COCO / Flickr
    retrieval's convention: any ground-truth match counts); `duplicate_caption_groups` says how many captions were
    shared so. `captions=None` says that every pair is distinct (each row's only right answer is its own). A right
    answer ranks 1 + the number of wrong candidates scoring at least as high as the best right one: ties with a
    wrong candidate count against it, ties among right ones do not.
    """
    if img_emb.shape != txt_emb.shape or img_emb.ndim != 2:
        raise LdmError(f"retrieval needs paired `n d` embeddings, got {tuple(img_emb.shape)} and {tuple(txt_emb.shape)}")
    n = img_emb.shape[0]
    if captions is not None and len(captions) != n:
        raise LdmError(f"retrieval: {len(captions)} captions for {n} image-text pairs")
    groups = caption_groups(captions) if captions is not None else torch.arange(n)
    right = groups[:, None] == groups[None, :]  # images x texts: a ground-truth pair
    sim = F.normalize(img_emb.double(), dim=-1) @ F.normalize(txt_emb.double(), dim=-1).T  # images x texts
    wrong = sim.masked_fill(right, float("-inf"))
    best_i2t = sim.masked_fill(~right, float("-inf")).amax(dim=1)  # per image: its best right text
    best_t2i = sim.masked_fill(~right, float("-inf")).amax(dim=0)  # per text: its best right image
    rank_i2t = 1 + (wrong >= best_i2t[:, None]).sum(dim=1)
    rank_t2i = 1 + (wrong >= best_t2i[None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"t2i_top{k}"] = float((rank_t2i <= k).double().mean())
        out[f"i2t_top{k}"] = float((rank_i2t <= k).double().mean())
    out["duplicate_caption_groups"] = float((torch.bincount(groups, minlength=n) > 1).sum())
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

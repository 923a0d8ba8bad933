"""Caption dropout for classifier-free guidance (Ho & Salimans 2022, sec. 3.2): the one place it happens."""
from __future__ import annotations

import torch

EMPTY_CAPTION = ""


def drop_captions(captions: list[str], p: float, generator: torch.Generator | None = None) -> tuple[list[str], torch.Tensor]:
    """Replace each caption by "" with probability p; returns (captions, dropped `b` bool) so precomputed
    text embeddings can be swapped for the empty prompt's with the same decision."""
    dropped = torch.rand(len(captions), generator=generator) < p if p > 0 else torch.zeros(len(captions), dtype=torch.bool)
    kept = [EMPTY_CAPTION if d else c for c, d in zip(captions, dropped.tolist())]
    return kept, dropped

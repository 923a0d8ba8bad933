"""Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel over subsets (Binkowski et al. 2018)."""

from __future__ import annotations

import torch

from ldm.errors import LdmError


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3, `n d, m d -> n m`."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 of two equal-size sets `m d` (eq. 2 of Binkowski et al.; cross term over all pairs)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    off_diag = (k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum())
    return float(off_diag / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    *,
    subsets: int = 100,  # number of random subset pairs averaged
    subset_size: int = 1000,  # images per subset (clipped to the smaller set)
    seed: int = 0,
) -> tuple[float, float]:
    """KID mean and standard deviation over random subsets of the two feature sets `n d`, `m d`."""
    if feats_a.shape[1] != feats_b.shape[1]:
        raise LdmError(f"feature dimensions differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    size = min(subset_size, feats_a.shape[0], feats_b.shape[0])
    if size < 2:
        raise LdmError(f"KID needs at least 2 images per set, got {feats_a.shape[0]} and {feats_b.shape[0]}")
    a, b = feats_a.double().cpu(), feats_b.double().cpu()
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            mmd2_unbiased(
                a[torch.randperm(a.shape[0], generator=gen)[:size]], b[torch.randperm(b.shape[0], generator=gen)[:size]]
            )
            for _ in range(subsets)
        ]
    )
    return float(values.mean()), float(values.std(unbiased=False)) if subsets > 1 else 0.0

"""Improved precision and recall (Kynkaanniemi et al. 2019): how much of each set lies on the other's k-NN manifold.

The manifold of a feature set is the union of balls around its points, each with the radius of that point's k-th
nearest neighbour in the set (itself excluded). Precision is the fraction of generated features inside the real
manifold (fidelity), recall the fraction of real features inside the generated one (diversity); Improved DDPM
(Nichol & Dhariwal 2021) reports them with k = 3 beside FID.
"""

from __future__ import annotations

import torch

from ldm.errors import LdmError

PR_K = 3  # the neighbourhood size of the paper's experiments and of Improved DDPM's tables


def knn_radii(feats: torch.Tensor, k: int = PR_K, *, block: int = 1024) -> torch.Tensor:
    """Distance of each point `n d` to its k-th nearest neighbour among the others (`n`), in row blocks."""
    if feats.shape[0] <= k:
        raise LdmError(f"a k-NN radius with k={k} needs more than {k} points, got {feats.shape[0]}")
    radii = []
    for start in range(0, feats.shape[0], block):
        d = torch.cdist(feats[start:start + block], feats)  # b n
        # the k+1 smallest include the point itself at distance 0
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def manifold_coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, *,
                      block: int = 1024) -> float:
    """Fraction of `queries` within radius[j] of some manifold point j (boundaries count as inside, as the paper)."""
    inside = []
    for start in range(0, queries.shape[0], block):
        d = torch.cdist(queries[start:start + block], manifold)  # b n
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_K) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` against real ones `real` (`n d`, `m d`)."""
    if real.shape[1] != fake.shape[1]:
        raise LdmError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    real, fake = real.double().cpu(), fake.double().cpu()
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return precision, recall

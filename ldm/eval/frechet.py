"""Frechet distance between Gaussians fitted to features: FID (Heusel et al. 2017) and its CLIP-space variant."""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from ldm.atomic import atomic_write_bytes
from ldm.errors import LdmError


@dataclass
class GaussianStats:
    """Mean `mu` (d,) and covariance `sigma` (d, d) of `n` feature vectors, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0  # 0 = unknown (pytorch-fid .npz files do not store it)
    extractor: str = ""  # the feature space, e.g. "inception-v3-tf" or "clip:ViT-B-32:openai"; "" = unknown

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


class FeatureMoments:
    """Count, mean and scatter sum (x - mean)(x - mean)^T in float64, merged batch by batch and across processes.

    Merging moments (Chan, Golub & LeVeque 1979) rather than adding raw sums of x and x x^T keeps the covariance
    exact when features vary little around a large mean (raw sums cancel catastrophically there).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def _merge(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.n + n
        if total == 0:
            return
        delta = mean - self.mean  # d
        # out of place: the moments may be made under torch.inference_mode() and merged outside it
        self.m2 = self.m2 + m2 + torch.outer(delta, delta) * (self.n * n / total)
        self.mean = self.mean + delta * (n / total)
        self.n = total

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of features `b d`."""
        x = x.to(dtype=torch.float64, device=self.mean.device)
        mean = x.mean(0)
        centred = x - mean
        self._merge(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), mean, centred.T @ centred)

    def reduce(self, accelerator) -> None:
        """Merge the moments of all processes (no-op for a single process)."""
        if accelerator is None or accelerator.num_processes == 1:
            return
        ns, means, m2s = (accelerator.gather(t[None]) for t in (self.n, self.mean, self.m2))  # world ...
        self.n, self.mean, self.m2 = torch.zeros_like(ns[0]), torch.zeros_like(means[0]), torch.zeros_like(m2s[0])
        for n, mean, m2 in zip(ns, means, m2s):
            self._merge(n, mean, m2)

    def to_stats(self, extractor: str = "") -> GaussianStats:
        """Mean and unbiased covariance (ddof=1, as numpy.cov and pytorch-fid)."""
        n = int(self.n.item())
        if n < 2:
            raise LdmError(f"a covariance needs at least 2 images, got {n}")
        sigma = self.m2.cpu().numpy() / (n - 1)
        return GaussianStats(mu=self.mean.cpu().numpy().copy(), sigma=(sigma + sigma.T) / 2, n=n, extractor=extractor)


def stats_from_features(x: torch.Tensor | np.ndarray, extractor: str = "") -> GaussianStats:
    """Gaussian statistics of a feature matrix `n d`."""
    moments = FeatureMoments(x.shape[1])
    moments.add(torch.as_tensor(x))
    return moments.to_stats(extractor)


def _clip_round_off(w: np.ndarray) -> np.ndarray:
    """Zero eigenvalues below the round-off floor d * eps * max|w|: their size is noise, and sqrt would amplify it."""
    tol = w.shape[0] * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), 1e-300)
    return np.where(w > tol, w, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Dowson & Landau 1982; eq. 6 of Heusel et al. 2017).

    tr (S1 S2)^(1/2) is the sum of square roots of the eigenvalues of S1 S2. With S1 = B B^T (B = V sqrt(w) from
    the eigendecomposition of S1, only its non-zero eigenvalues kept), the non-zero eigenvalues of S1 S2 = B B^T S2
    are those of the symmetric PSD matrix B^T S2 B (eig(XY) = eig(YX)), which is only rank(S1) wide. Symmetric
    eigendecompositions avoid the complex round-off and the eps*I retry that `scipy.linalg.sqrtm` of the
    non-symmetric S1 S2 needs when a covariance is rank-deficient (fewer images than feature dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise LdmError(
            f"feature dimensions differ: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}; "
            "both statistics must come from the same feature extractor"
        )
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    w = _clip_round_off(w)
    factor = v[:, w > 0] * np.sqrt(w[w > 0])  # d r, S1 = B B^T
    middle = factor.T @ ((sigma2 + sigma2.T) / 2) @ factor  # r r
    tr_covmean = np.sqrt(_clip_round_off(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mu1 - mu2
    # A distance is never negative; identical statistics give round-off of either sign (-1.6e-30 was seen).
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def fid(stats_a: GaussianStats, stats_b: GaussianStats) -> float:
    """Frechet distance between two feature Gaussians (FID for Inception features, FD_CLIP for CLIP ones)."""
    if stats_a.extractor and stats_b.extractor and stats_a.extractor != stats_b.extractor:
        raise LdmError(
            f"statistics come from different feature extractors ({stats_a.extractor!r} vs {stats_b.extractor!r}); "
            "make both with the same extractor and resizer (a pytorch-fid .npz holds TF-Inception statistics made "
            "with the default tf-bilinear resizer)"
        )
    if stats_a.dim != stats_b.dim:
        raise LdmError(
            f"feature dimensions differ: {stats_a.dim} vs {stats_b.dim}; "
            "both statistics must come from the same feature extractor"
        )
    return frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)


def save_stats(path: str | os.PathLike, stats: GaussianStats) -> None:
    """Write a pytorch-fid compatible .npz (`mu`, `sigma`, plus `n` and `extractor`), atomically."""
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), extractor=np.str_(stats.extractor))
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path: str | os.PathLike) -> GaussianStats:
    """Read a pytorch-fid style .npz with `mu` and `sigma` (our optional `n`, `extractor` too)."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):  # np.load would read a .npy, or offer unpickling
        raise LdmError(f"{path}: not a .npz archive (numpy.savez's format, holding mu and sigma); truncated or "
                       "corrupt? Write it again with ldm-fid --save-stats")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("mu", "sigma") if k not in f.files]
            if missing:
                raise LdmError(
                    f"{path}: statistics file lacks {missing} (has {f.files}); expected pytorch-fid style mu, sigma"
                )
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f.files else 0
            extractor = str(f["extractor"]) if "extractor" in f.files else ""
    except LdmError:
        raise
    except (OSError, ValueError) as e:
        raise LdmError(f"{path}: cannot read statistics file: {e}") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise LdmError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise LdmError(f"{path}: mu or sigma holds NaN or infinite values; FID of it would be meaningless")
    if np.abs(sigma - sigma.T).max() > 1e-3 * np.abs(sigma).max():
        raise LdmError(f"{path}: sigma is not symmetric, so it is not a covariance matrix; is this a statistics file?")
    return GaussianStats(mu=mu, sigma=sigma, n=n, extractor=extractor)

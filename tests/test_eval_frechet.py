"""Frechet distance and KID maths on Gaussians with known answers; statistics files."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.errors import LdmError
from ldm.eval.frechet import (
    FeatureMoments,
    GaussianStats,
    fid,
    frechet_distance,
    load_stats,
    save_stats,
    stats_from_features,
)
from ldm.eval.kid import kid


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def _closed_form(mu1, a, mu2, b):
    """||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2 for covariances sharing eigenvectors with eigenvalues a, b."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


@pytest.mark.parametrize("nearly_singular", [False, True])
def test_frechet_matches_closed_form_for_commuting_covariances(nearly_singular):
    d = 64
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    if nearly_singular:  # half the spectrum ~1e-12, one exactly zero: rank-deficient like n < 2048 FID features
        a[: d // 2] = 1e-12
        b[d // 4 : 3 * d // 4] = 1e-13
        a[0] = 0.0
    q = _rotation(d, 2)  # the same eigenvectors: covariances commute but are not diagonal
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = _closed_form(mu1, a, mu2, b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-6)


def test_frechet_agrees_with_scipy_sqrtm_on_general_covariances():
    d = 32
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((200, d)), rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) * 0.5 + 1.0
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    mu1, mu2 = x.mean(0), y.mean(0)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the pytorch-fid formulation
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero_even_when_rank_deficient():
    x = torch.randn(100, 256, dtype=torch.float64) * 3 + 1  # n < d: singular covariance
    stats = stats_from_features(x)
    scale = np.trace(stats.sigma)
    assert abs(fid(stats, stats)) < 1e-9 * scale


def test_moments_give_numpy_mean_and_unbiased_covariance_across_batches():
    x = torch.randn(37, 8, dtype=torch.float64) + 5
    moments = FeatureMoments(8)
    for chunk in x.split(10):  # batches (and processes) merge
        moments.add(chunk)
    stats = moments.to_stats("test")
    np.testing.assert_allclose(stats.mu, x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    assert stats.n == 37 and stats.extractor == "test"


def test_moments_stay_exact_for_tiny_variation_around_a_large_mean():
    x = 1e3 + 1e-6 * torch.randn(50, 4, dtype=torch.float64)  # raw sums of x x^T would cancel to noise here
    moments = FeatureMoments(4)
    for chunk in x.split(7):
        moments.add(chunk)
    np.testing.assert_allclose(moments.to_stats().sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-6, atol=1e-18)


class _TwoProcesses:
    """Stands in for accelerate: gather() stacks this process's tensor with the other process's."""

    num_processes = 2

    def __init__(self, other):
        self.other = iter((other.n, other.mean, other.m2))

    def gather(self, t):
        return torch.cat([t, next(self.other)[None]])


def test_moments_merged_across_processes_equal_one_pass():
    x = torch.randn(23, 5, dtype=torch.float64) * 2 + 3
    mine, theirs = FeatureMoments(5), FeatureMoments(5)
    with torch.inference_mode():  # as in compute_features; the merge runs outside it
        mine.add(x[::2])  # every world_size-th image per process, as compute_features shards them
        theirs.add(x[1::2])
    mine.reduce(_TwoProcesses(theirs))
    stats = mine.to_stats()
    assert stats.n == 23
    np.testing.assert_allclose(stats.mu, x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def test_one_image_cannot_make_a_covariance():
    with pytest.raises(LdmError, match="at least 2 images"):
        stats_from_features(torch.randn(1, 4))


def test_npz_round_trip_and_pytorch_fid_layout(tmp_path):
    stats = stats_from_features(torch.randn(10, 6), extractor="clip:x:y")
    save_stats(tmp_path / "s.npz", stats)
    with np.load(tmp_path / "s.npz") as f:
        assert set(f.files) >= {"mu", "sigma"}
    back = load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert (back.n, back.extractor) == (10, "clip:x:y")
    np.savez(tmp_path / "plain.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma)  # pytorch-fid file
    assert load_stats(tmp_path / "plain.npz").extractor == ""


def test_mismatched_dimensions_and_bad_files_are_clear_errors(tmp_path):
    a = GaussianStats(np.zeros(4), np.eye(4))
    b = GaussianStats(np.zeros(3), np.eye(3))
    with pytest.raises(LdmError, match="feature dimensions differ: 4 vs 3"):
        fid(a, b)
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(3))
    with pytest.raises(LdmError, match="lacks \\['sigma'\\]"):
        load_stats(tmp_path / "nosigma.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(LdmError, match="not a .npz archive"):
        load_stats(tmp_path / "junk.npz")


def test_kid_matches_torch_fidelity_on_full_sets():
    from torch_fidelity.metric_kid import kid_features_to_metric

    a = torch.randn(40, 16, dtype=torch.float64)
    b = torch.randn(40, 16, dtype=torch.float64) * 1.3 + 0.2
    mean, std = kid(a, b, subsets=3, subset_size=40)  # subsets are the whole sets: no randomness in either
    theirs = kid_features_to_metric(
        a,
        b,
        kid_subsets=3,
        kid_subset_size=40,
        verbose=False,
        rng_seed=0,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
    )
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert std == pytest.approx(0.0, abs=1e-12)

import numpy as np
import pytest
import torch

from ldm.diffusion.guidance import dynamic_threshold


def paper_pseudocode(x0: np.ndarray, p: float) -> np.ndarray:
    """Saharia et al. 2022, App. E: s = max(percentile(|x0|, p), 1) per sample; x0 = clip(x0, -s, s) / s."""
    s = np.percentile(np.abs(x0), p * 100, axis=tuple(range(1, x0.ndim)))
    s = np.maximum(s, 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -s, s) / s


def _hand_made() -> torch.Tensor:
    """Two samples with a known 90th percentile of |x0|: 3.6 for the first, below 1 (so s = 1) for the second."""
    magnitudes = torch.arange(101, dtype=torch.float64) * 0.04  # |x0| = 0, 0.04, ..., 4.0: 90% quantile = 3.6
    signs = torch.where(torch.arange(101) % 2 == 0, 1.0, -1.0).double()
    first = (magnitudes * signs)[torch.randperm(101, generator=torch.Generator().manual_seed(0))]
    second = torch.linspace(-0.9, 0.8, 101, dtype=torch.float64)
    return torch.stack([first, second]).reshape(2, 1, 1, 101)


def _threshold(x0: torch.Tensor, p: float) -> torch.Tensor:
    return dynamic_threshold(lambda x, sigma, cond: x0, percentile=p)(x0, torch.ones(len(x0)), None)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2 ** -11), (torch.bfloat16, 2 ** -8)])
def test_matches_paper_pseudocode_with_known_percentile(dtype, tol):
    x0 = _hand_made().to(dtype)
    out = _threshold(x0, 0.9)
    assert out.dtype == dtype
    ref = paper_pseudocode(x0.double().numpy(), 0.9)  # the pseudocode on exactly the values the function saw
    assert np.abs(out.double().numpy() - ref).max() <= tol
    # the known answer: sample 0 clipped to +-3.6 and divided by 3.6; sample 1 untouched (s = max(q, 1) = 1)
    exact = _hand_made()
    known = torch.stack([exact[0].clamp(-3.6, 3.6) / 3.6, exact[1]])
    assert (out.double() - known).abs().max() <= tol + 2 * torch.finfo(dtype).eps
    assert out[0].abs().max() == 1.0


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2 ** -11), (torch.bfloat16, 2 ** -8)])
def test_matches_pseudocode_on_random_images_within_half_an_ulp(dtype, tol):
    # tol = half an ulp at 1: the maths in float32 and one rounding at the end (clamping and dividing in fp16/bf16
    # rounds s and the quotient separately: 6.4e-4 and 4.4e-3 on these tensors, more than half an ulp)
    g = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.3, 5.0, 64)[:, None, None, None]
    x0 = (torch.randn(64, 3, 32, 32, generator=g) * scales).to(dtype)
    out = _threshold(x0, 0.995)
    ref = paper_pseudocode(x0.double().numpy(), 0.995)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert np.abs(out.double().numpy() - ref).max() <= tol

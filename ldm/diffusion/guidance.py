"""Guidance: functions that wrap a denoiser and return a denoiser `(x, sigma, cond) -> x0`.

A wrapped denoiser that offers `forward_with_variance` (a learned-variance network) keeps offering it, and its
`variance_type`, so the DDPM sampler can still use the variance output.
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.diffusion.denoiser import append_dims, batch_sigma


class _Wrapped:
    """A denoiser made of a function `(x, sigma, cond, with_variance) -> (x0, variance or None)`."""

    def __init__(self, inner, fn: Callable):
        self.inner = inner
        self._fn = fn
        if hasattr(inner, "forward_with_variance"):
            self.forward_with_variance = lambda x, sigma, cond=None: self._fn(x, sigma, cond, True)
            self.variance_type = getattr(inner, "variance_type", None)  # how the DDPM sampler reads the variance

    def __call__(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        return self._fn(x, sigma, cond, False)[0]


def _run(denoiser, x, sigma, cond, with_variance: bool):
    if with_variance:
        return denoiser.forward_with_variance(x, sigma, cond)
    return denoiser(x, sigma, cond), None


def _cat_cond(uncond: dict, cond: dict) -> dict:
    """Stack two conditioning dicts along the batch: [uncond, cond] for every tensor keyword argument."""
    if set(uncond) != set(cond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out = {}
    for key, c in cond.items():
        u = uncond[key]
        if torch.is_tensor(c):
            if not torch.is_tensor(u) or u.shape[1:] != c.shape[1:]:
                raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must be tensors of matching shapes")
            out[key] = torch.cat([u, c])
        elif c is None and u is None:
            out[key] = None
        elif c == u:
            out[key] = c
        else:
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] differ but are not tensors")
    return out


def _output_space(denoiser, x: torch.Tensor, sigma: torch.Tensor):
    """(c_skip, c_out) of the network output the denoiser's parameterisation predicts (eps when unknown)."""
    scaling = getattr(denoiser, "scaling", None)
    if scaling is None:
        return torch.ones_like(sigma), -sigma
    c_skip, c_out, _, _ = scaling(sigma)
    return append_dims(c_skip, x.ndim), append_dims(c_out, x.ndim)


def rescale_guidance(x0_cfg, x0_cond, x, c_skip, c_out, rescale: float):
    """Lin et al. 2023, eqs. 15-16 on the network-output equivalent F = (x0 - c_skip x) / c_out (eps or v).

    F_rescaled = F_cfg * std(F_cond) / std(F_cfg); F = rescale * F_rescaled + (1 - rescale) * F_cfg, as diffusers'
    `rescale_noise_cfg` does on the model output, mapped back to x0.
    """
    f_cfg = (x0_cfg - c_skip * x) / c_out
    f_cond = (x0_cond - c_skip * x) / c_out
    dims = list(range(1, x.ndim))
    # A constant guided output (std 0) would give 0/0: leave such a sample unscaled instead of NaN.
    ratio = f_cond.std(dim=dims, keepdim=True) / f_cfg.std(dim=dims, keepdim=True).clamp_min(1e-12)
    f = rescale * (f_cfg * ratio) + (1 - rescale) * f_cfg
    return c_skip * x + c_out * f


def cfg(denoiser, scale: float, rescale: float = 0.0):
    """Classifier-free guidance (Ho & Salimans 2022): x0 = x0_u + scale (x0_c - x0_u), one batched call of [u, c].

    `cond` is {"cond": {...}, "uncond": {...}}; `rescale` > 0 applies guidance rescale (Lin et al. 2023, Sec. 3.4).
    With a learned-variance network the conditional half's variance output is kept (as DeepFloyd IF does).
    """

    def guided(x, sigma, cond, with_variance):
        if cond is None or "cond" not in cond:
            raise ValueError('cfg needs cond = {"cond": {...}, "uncond": {...}}')
        sigma = batch_sigma(sigma, x)
        both = _cat_cond(cond["uncond"] or {}, cond["cond"] or {})
        x0, variance = _run(denoiser, torch.cat([x, x]), torch.cat([sigma, sigma]), both, with_variance)
        x0_uncond, x0_cond = x0.chunk(2)
        x0 = x0_uncond + scale * (x0_cond - x0_uncond)
        if rescale > 0:
            x0 = rescale_guidance(x0, x0_cond, x, *_output_space(denoiser, x, sigma), rescale)
        return x0, (variance.chunk(2)[1] if variance is not None else None)

    return _Wrapped(denoiser, guided)


def dynamic_threshold(denoiser, percentile: float = 0.995, max_value: float = float("inf")):
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3) of x0 in data space.

    Per sample s = clamp(quantile(|x0|, percentile), 1, max_value); x0 = clamp(x0, -s, s) / s. With max_value = 1 this
    is static clipping to [-1, 1] (diffusers' clip_sample). Meant for pixel-space models.
    """

    def thresholded(x, sigma, cond, with_variance):
        x0, variance = _run(denoiser, x, sigma, cond, with_variance)
        # In float32 whatever x0's dtype: torch.quantile rejects half precision (imagen-pytorch's version fails on
        # fp16 there), and one rounding at the end keeps fp16/bf16 outputs within half an ulp of the maths.
        x0_32 = x0.float()
        s = torch.quantile(x0_32.flatten(1).abs(), percentile, dim=1).clamp(min=1.0, max=max_value)
        s = append_dims(s, x0.ndim)
        return (torch.maximum(torch.minimum(x0_32, s), -s) / s).to(x0.dtype), variance

    return _Wrapped(denoiser, thresholded)


def static_threshold(denoiser, limit: float = 1.0):
    """Static thresholding (Saharia et al. 2022, Sec. 2.3): x0 clipped to [-limit, limit] (diffusers' clip_sample)."""

    def clipped(x, sigma, cond, with_variance):
        x0, variance = _run(denoiser, x, sigma, cond, with_variance)
        return x0.clamp(-limit, limit), variance

    return _Wrapped(denoiser, clipped)


def classifier_guidance(denoiser, grad_log_prob: Callable, scale: float = 1.0):
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 1): x0 += scale * sigma^2 * grad_x log p(y | x, sigma).

    Tweedie: x0 = x + sigma^2 grad log p(x); adding the classifier's gradient to the score shifts x0 by sigma^2 times
    it. `grad_log_prob(x, sigma, cond) -> tensor like x` (see `classifier_grad` for a noisy classifier).
    """

    def guided(x, sigma, cond, with_variance):
        sigma = batch_sigma(sigma, x)
        x0, variance = _run(denoiser, x, sigma, cond, with_variance)
        grad = grad_log_prob(x, sigma, cond)
        return x0 + scale * append_dims(sigma, x.ndim) ** 2 * grad, variance

    return _Wrapped(denoiser, guided)


def classifier_grad(classifier: Callable, labels: torch.Tensor) -> Callable:
    """grad_x log softmax(classifier(x, sigma))[labels] for a noise-aware classifier taking (x, sigma)."""

    def grad_log_prob(x, sigma, cond=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, sigma), dim=-1)
            selected = log_probs[torch.arange(len(labels), device=x.device), labels.to(x.device)]
            return torch.autograd.grad(selected.sum(), x_in)[0]

    return grad_log_prob

"""DPM-Solver's singlestep solvers over a sigma range: k-diffusion's "DPM fast" and "DPM adaptive" (Lu et al. 2022).

Both integrate the probability-flow ODE in log-SNR time lambda = -log sigma (VE coordinates: alpha = 1,
sigma = e^-lambda) from the first sigma of `sigmas` down to the last nonzero one, and return x *at that sigma*, as
k-diffusion does (no final denoising step): only the two ends of `sigmas` matter, and `dpm_fast` takes its number of
model evaluations from its length. The steps are DPM-Solver-1, -2 and -3 in their noise-prediction form (Lu et al. 2022,
eq. 3.7 and Alg. 1-2, with r1 = 1/2 for order 2 alone, r1 = 1/3 and r2 = 2/3 for order 3); eta > 0 makes each step an
ancestral one (DPM-Solver to the lower sigma of `ancestral_step`, then fresh noise).

Step times are kept per image, so `dpm_adaptive` chooses each image's step sizes from that image's own error: an image
of a batch is the image of a batch of one with its seed (`ldm.runtime.ImageGenerators`), as for the other samplers.
(k-diffusion controls one step size from the error norm of the whole batch; for a batch of one the two agree.)
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ldm.diffusion.samplers import _noise, _sigma_list
from ldm.errors import LdmError
from ldm.runtime import ImageGenerators, randn

_DONE = 1e-5  # a row within this much lambda of the end has arrived (k-diffusion's tolerance)


def _sigma_range(sigmas) -> tuple[float, float]:
    """(sigma_max, sigma_min): the first sigma and the last nonzero one."""
    sigmas = _sigma_list(sigmas)
    nonzero = [s for s in sigmas if s > 0]
    if len(sigmas) < 2 or not nonzero or sigmas[0] <= 0:
        raise ValueError(f"DPM-Solver needs sigmas from a positive sigma_max down to a positive sigma_min, got {sigmas}")
    return sigmas[0], nonzero[-1]


def _rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-row (b,) float64 coefficient as a `b 1 ... 1` tensor in x's dtype and device."""
    return v.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _phi_minus_one(z: torch.Tensor) -> torch.Tensor:
    """(e^z - 1) / z - 1, which tends to 0 with z (a row whose step has length 0)."""
    safe = torch.where(z == 0, torch.ones_like(z), z)
    return torch.where(z == 0, torch.zeros_like(z), torch.expm1(safe) / safe - 1)


class _Stages:
    """The noise predictions eps(x, lambda) = (x - D(x, sigma)) / sigma of one step, counted."""

    def __init__(self, denoiser, cond):
        self.denoiser, self.cond, self.nfe = denoiser, cond, 0

    def __call__(self, x: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, denoised) at per-row log-SNR `lam`."""
        sigma = torch.exp(-lam)
        denoised = self.denoiser(x, sigma.to(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32),
                                 self.cond)
        self.nfe += 1
        return (x - denoised) / _rows(sigma, x), denoised


def _dpm_solver(stages: _Stages, x, eps, lam, lam_next, orders: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """x at `lam_next` by DPM-Solver of each order in `orders` (1, 2 or 3; 2 and 3 together share their first stage,
    the embedded pair of DPM-Solver-23). `eps` is the prediction at `lam`; lambdas are (b,) float64.

    With h = lambda_next - lambda, sigma_next (e^h - 1) = sigma - sigma_next, DPM-Solver-1 is the DDIM step
    x - sigma_next (e^h - 1) eps; higher orders correct it with the change of eps across the step (Lu et al. 2022).
    """
    h = lam_next - lam
    sigma_next = torch.exp(-lam_next)
    first = x - _rows(sigma_next * torch.expm1(h), x) * eps  # DPM-Solver-1
    out = {1: first} if 1 in orders else {}
    if orders == (1,):
        return out
    r1 = 1 / 3 if 3 in orders else 1 / 2
    sigma_1 = torch.exp(-(lam + r1 * h))
    u1 = x - _rows(sigma_1 * torch.expm1(r1 * h), x) * eps
    change_1 = stages(u1, lam + r1 * h)[0] - eps
    if 2 in orders:  # Alg. 1: the midpoint's slope, eps(s1) - eps(s) over r1
        out[2] = first - _rows(sigma_next * torch.expm1(h) / (2 * r1), x) * change_1
    if 3 in orders:  # Alg. 2: a second stage at r2 = 2/3 from the first, then the step on its slope
        r2 = 2 / 3
        sigma_2 = torch.exp(-(lam + r2 * h))
        u2 = (x - _rows(sigma_2 * torch.expm1(r2 * h), x) * eps
              - _rows(sigma_2 * (r2 / r1) * _phi_minus_one(r2 * h), x) * change_1)
        change_2 = stages(u2, lam + r2 * h)[0] - eps
        out[3] = first - _rows(sigma_next / r2 * _phi_minus_one(h), x) * change_2
    return out


def _ancestral_lambdas(lam, lam_next, lam_end, eta):
    """(lambda_down, sigma_up) per row: `ancestral_step`'s sigma_down as a lambda (at most lam_end, the last one the
    solver reaches), and the noise std that brings the variance back to sigma_next's."""
    sigma, sigma_next = torch.exp(-lam), torch.exp(-lam_next)
    if not eta:
        return lam_next, torch.zeros_like(lam)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    lam_down = torch.clamp(-torch.log((sigma_next**2 - sigma_up**2).sqrt()), max=lam_end)
    return lam_down, (sigma_next**2 - torch.exp(-lam_down) ** 2).sqrt()


def _report(callback, x, i, sigma, denoised, **info) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised, **info})


def dpm_fast_orders(nfe: int) -> list[int]:
    """The orders of DPM-Solver-fast's steps for `nfe` model evaluations (Lu et al. 2022, Sec. 3.4): as many order-3
    steps as fit, closed by one of order nfe mod 3, or by orders 2 and 1 where 3 divides nfe."""
    if nfe < 1:
        raise ValueError(f"DPM-Solver-fast needs at least 1 model evaluation, got {nfe}")
    steps = nfe // 3 + 1
    return [3] * (steps - 2) + [2, 1] if nfe % 3 == 0 else [3] * (steps - 1) + [nfe % 3]


@torch.no_grad()
def sample_dpm_fast(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                    eta=0.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver-fast (k-diffusion's "DPM fast"): len(sigmas) - 1 model evaluations spent on steps of equal length in
    lambda from sigmas[0] to the last nonzero sigma, orders by `dpm_fast_orders`; returns x at that sigma.

    eta > 0: ancestral steps with noise from `generator`, or `noise_sampler(sigma, sigma_next)`, drawn on every step.
    """
    sigma_max, sigma_min = _sigma_range(sigmas)
    orders = dpm_fast_orders(len(sigmas) - 1)
    if sigma_min >= sigma_max:
        return x  # nothing to integrate
    lam_end = torch.tensor(-math.log(sigma_min), dtype=torch.float64)
    lambdas = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), len(orders) + 1, dtype=torch.float64)
    stages, rows = _Stages(denoiser, cond), x.shape[0]
    with tqdm(total=len(sigmas) - 1, unit="nfe", disable=disable_progress) as bar:
        for i, order in enumerate(orders):
            lam, lam_next = lambdas[i].expand(rows), lambdas[i + 1].expand(rows)
            lam_to, sigma_up = _ancestral_lambdas(lam, lam_next, lam_end, eta)
            eps, denoised = stages(x, lam)
            x = _dpm_solver(stages, x, eps, lam, lam_to, (order,))[order]
            if eta:
                sigma, sigma_next = math.exp(-lambdas[i].item()), math.exp(-lambdas[i + 1].item())
                noise = _noise(x, generator) if noise_sampler is None else noise_sampler(sigma, sigma_next)
                x = x + _rows(sigma_up, x) * s_noise * noise
            bar.update(order)
            _report(callback, x, i, math.exp(-lambdas[i].item()), denoised)
    return x


class _StepSizes:
    """Per-row PID step-size control on the error estimate (Söderlind 2003's digital filter with an arctan limiter,
    as k-diffusion's PIDStepSizeController): h <- h * limit(prod_k (1 / err_k)^b_k), accepted where the factor
    reaches `accept_safety`."""

    def __init__(self, rows: int, h_init, pcoeff, icoeff, dcoeff, order, accept_safety):
        self.h = torch.full((rows,), float(abs(h_init)), dtype=torch.float64)
        self.exponents = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety = accept_safety
        self.inverse_errors = None  # (rows, 3): the current, last accepted and one before

    def propose(self, error: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Update h from each active row's scaled error (rows, float64); returns which rows accept their step."""
        inverse = 1 / (error + 1e-8)
        if self.inverse_errors is None:
            self.inverse_errors = inverse[:, None].repeat(1, 3)
        errors = self.inverse_errors.clone()
        errors[:, 0] = inverse
        factor = math.prod(errors[:, k] ** b for k, b in enumerate(self.exponents))
        factor = 1 + torch.atan(factor - 1)  # limits the factor to (1 - pi/4, 1 + pi/2)
        accept = (factor >= self.accept_safety) & active
        errors[accept, 1:] = errors[accept, :2]  # history moves on accepted steps only
        self.inverse_errors = torch.where(active[:, None], errors, self.inverse_errors)
        self.h = torch.where(active, self.h * factor, self.h)
        return accept


def _row_noise(x: torch.Tensor, generator, rows: torch.Tensor) -> torch.Tensor:
    """Standard normal noise for the marked rows (zeros elsewhere), drawn only for them: image k's generator of an
    `ImageGenerators` advances only when image k takes a noisy step."""
    noise = torch.zeros_like(x)
    index = rows.nonzero().flatten().tolist()
    shape = (len(index), *x.shape[1:])
    if generator is None:
        drawn = torch.randn(shape, dtype=x.dtype)
    else:
        drawn = randn(shape, generator.subset(index) if isinstance(generator, ImageGenerators) else generator, x.dtype)
    noise[rows.to(x.device)] = drawn.to(x.device)
    return noise


def _scaled_error(low, high, x_prev, rtol, atol) -> torch.Tensor:
    """Per row, the RMS of (low - high) / max(atol, rtol * max(|low|, |x_prev|)), in float32 at least (float64 CPU)."""
    dtype = torch.float64 if low.dtype == torch.float64 else torch.float32
    low, high, x_prev = low.to(dtype), high.to(dtype), x_prev.to(dtype)
    scale = torch.maximum(torch.tensor(atol, dtype=dtype), rtol * torch.maximum(low.abs(), x_prev.abs()))
    error = torch.linalg.vector_norm(((low - high) / scale).flatten(1), dim=1) / math.sqrt(low[0].numel())
    return error.double().cpu()


@torch.no_grad()
def sample_dpm_adaptive(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, disable_progress=True,
                        order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0, max_nfe=10000):
    """DPM-Solver-12 / -23 with adaptive step size (k-diffusion's "DPM adaptive", Lu et al. 2022, Sec. 3.4 and App. C):
    each step computes orders `order` - 1 and `order` from shared stages, scores their difference against
    max(atol, rtol * |x|) (RMS over the image), and lets a PID controller set the next step. From sigmas[0] to the
    last nonzero sigma; the number of model evaluations follows the tolerances, not len(sigmas). Returns x at that
    sigma. eta > 0: ancestral steps, noise from `generator` on accepted steps. More than `max_nfe` model evaluations
    is an error (k-diffusion has no limit): a stiff problem, e.g. strong classifier guidance at a pixel model's sigma_max,
    keeps the steps tiny for as long as one cares to wait.
    """
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    sigma_max, sigma_min = _sigma_range(sigmas)
    rows = x.shape[0]
    lam_start, lam_end = -math.log(sigma_max), torch.tensor(-math.log(sigma_min), dtype=torch.float64)
    lam = torch.full((rows,), lam_start, dtype=torch.float64)
    control = _StepSizes(rows, h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    stages, x_prev, i = _Stages(denoiser, cond), x, 0
    accepted = rejected = 0
    span = max(float(lam_end) - lam_start, 0.0)
    bar_format = "{l_bar}{bar}| log-SNR {n:.2f}/{total:.2f} [{elapsed}{postfix}]"
    with tqdm(total=span, bar_format=bar_format, disable=disable_progress) as bar:
        while bool((active := lam < lam_end - _DONE).any()):
            lam_next = torch.where(active, torch.minimum(lam + control.h, lam_end), lam)  # arrived rows stand still
            lam_to, sigma_up = _ancestral_lambdas(lam, lam_next, lam_end, eta)
            eps, denoised = stages(x, lam)
            pair = _dpm_solver(stages, x, eps, lam, lam_to, (order - 1, order))
            low, high = pair[order - 1], pair[order]
            error = _scaled_error(low, high, x_prev, rtol, atol)
            accept = control.propose(error, active)
            if eta and accept.any():
                high = high + _rows(sigma_up, x) * s_noise * _row_noise(x, generator, accept)
            take = _rows(accept.double(), x).bool()
            x_prev, x = torch.where(take, low, x_prev), torch.where(take, high, x)
            lam = torch.where(accept, lam_next, lam)
            accepted, rejected = accepted + int(accept.sum()), rejected + int((active & ~accept).sum())
            bar.update(min(float(lam.min()), float(lam_end)) - lam_start - bar.n)
            bar.set_postfix(nfe=stages.nfe, rejected=rejected, refresh=False)
            _report(callback, x, i, math.exp(-float(lam.min())), denoised, nfe=stages.nfe, n_accept=accepted,
                    n_reject=rejected)
            i += 1
            if stages.nfe >= max_nfe and bool((lam < lam_end - _DONE).any()):
                raise LdmError(f"dpm_adaptive stopped after {stages.nfe} model evaluations (max_nfe) at sigma "
                               f"{math.exp(-float(lam.min())):.4g}, on its way from {sigma_max:.4g} to {sigma_min:.4g}: "
                               f"its error estimate keeps the steps tiny (last {float(control.h.min()):.2g} in log-SNR; "
                               "a stiff problem, e.g. strong guidance). Loosen rtol / atol, raise max_nfe, or use "
                               "dpm_fast")
    return x

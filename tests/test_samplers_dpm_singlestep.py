"""dpm_fast and dpm_adaptive (k-diffusion's "DPM fast" / "DPM adaptive") on Gaussian data, whose exact denoiser and
probability-flow ODE solution are known in closed form; and against k-diffusion itself where it is importable."""
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import gaussian_denoiser, exact_ode, convergence_slope

from ldm.diffusion import ScheduleConfig, sampling_plan
from ldm.diffusion.dpm_singlestep import dpm_fast_orders, sample_dpm_adaptive, sample_dpm_fast
from ldm.diffusion.sampler_registry import check_sampler_options, run_sampler
from ldm.errors import ConfigError, LdmError
from ldm.runtime import ImageGenerators

X_T = torch.linspace(-20, 20, 9, dtype=torch.float64).view(9, 1)  # noise-level-10 samples, far into the tails


def _range(sigma_max, sigma_min, n=1):
    """n + 1 sigmas from sigma_max to sigma_min: dpm_fast's n model evaluations over that range."""
    return torch.tensor([sigma_max] + [sigma_min] * n, dtype=torch.float64)


def _nfe(sampler, x, sigmas, **options):
    seen = []
    sampler(gaussian_denoiser, x, sigmas, callback=seen.append, **options)
    return seen[-1].get("nfe"), seen


def test_dpm_fast_spends_exactly_its_budget_in_orders_of_three():
    assert dpm_fast_orders(1) == [1] and dpm_fast_orders(2) == [2] and dpm_fast_orders(3) == [2, 1]
    assert dpm_fast_orders(10) == [3, 3, 3, 1] and dpm_fast_orders(12) == [3, 3, 3, 2, 1]
    assert all(sum(dpm_fast_orders(n)) == n for n in range(1, 60))
    calls = []

    def counting(x, sigma, cond):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    sample_dpm_fast(counting, X_T.clone(), _range(10.0, 0.05, 10))
    assert len(calls) == 10 and calls[0] == pytest.approx(10.0) and min(calls) > 0.05  # the last sigma is not denoised


@pytest.mark.parametrize("evaluations, order", [(1, 1), (2, 2)])
def test_dpm_fast_single_steps_have_their_local_order(evaluations, order):
    """One step of DPM-Solver-k over log-SNR length h errs by O(h^(k+1)) on the exact ODE."""
    hs = [0.4, 0.2, 0.1, 0.05]
    errors = []
    for h in hs:
        sigma_end = 2.0 * math.exp(-h)
        out = sample_dpm_fast(gaussian_denoiser, X_T.clone(), _range(2.0, sigma_end, evaluations))
        errors.append((out - exact_ode(X_T, 2.0, sigma_end)).abs().max().item())
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert order + 1 - 0.15 < slope < order + 1 + 0.15, (slope, errors)


@pytest.mark.parametrize("order", [2, 3])
def test_one_adaptive_step_is_dpm_solver_of_its_order(order):
    """With a step as long as the range and a tolerance that accepts it, dpm_adaptive takes one DPM-Solver-`order`
    step: its error is O(h^(order+1)); DPM-Solver-3's error shrinks 16-fold per halving of h."""
    hs = [0.2, 0.1, 0.05, 0.025]
    errors = []
    for h in hs:
        sigma_end = 2.0 * math.exp(-h)
        nfe, _ = _nfe(sample_dpm_adaptive, X_T.clone(), _range(2.0, sigma_end), order=order, h_init=1.0, atol=1e6)
        assert nfe == order  # one step: the shared stages of the embedded pair
        out = sample_dpm_adaptive(gaussian_denoiser, X_T.clone(), _range(2.0, sigma_end), order=order, h_init=1.0,
                                  atol=1e6)
        errors.append((out - exact_ode(X_T, 2.0, sigma_end)).abs().max().item())
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert order + 1 - 0.2 < slope < order + 1 + 0.2, (slope, errors)


def test_dpm_fast_converges_at_third_order_in_its_evaluations():
    """NFE 3k + 2: order-3 steps closed by an order-2 one, a third-order method overall (3k and 3k + 1 end with a
    first-order step, which bounds them at second order as in Lu et al. 2022, Sec. 3.4)."""
    slope, errors = convergence_slope(sample_dpm_fast, steps=(11, 23, 47, 95))
    assert errors[-1] < 2e-5
    assert -3.7 < slope < -2.9, (slope, errors)


def test_dpm_adaptive_at_tight_tolerance_reaches_the_exact_ode_solution():
    reference = exact_ode(X_T, 10.0, 0.05)
    errors, evaluations = [], []
    for rtol in (1e-2, 1e-4, 1e-6):
        nfe, _ = _nfe(sample_dpm_adaptive, X_T.clone(), _range(10.0, 0.05), rtol=rtol, atol=rtol / 10)
        out = sample_dpm_adaptive(gaussian_denoiser, X_T.clone(), _range(10.0, 0.05), rtol=rtol, atol=rtol / 10)
        errors.append((out - reference).abs().max().item())
        evaluations.append(nfe)
    scale = reference.abs().max().item()
    assert errors[-1] < 1e-5 * scale, errors  # the exact solution, to the tolerance asked
    assert errors[0] > errors[1] > errors[2] and evaluations[0] < evaluations[1] < evaluations[2], (errors, evaluations)
    assert errors[-1] < 1e-3 * errors[0]  # the tolerance, not luck: four decades of rtol, three of error at least


def test_dpm_adaptive_order_2_reaches_it_too_and_len_sigmas_does_not_matter():
    reference = exact_ode(X_T, 10.0, 0.05)
    out = sample_dpm_adaptive(gaussian_denoiser, X_T.clone(), _range(10.0, 0.05), order=2, rtol=1e-6, atol=1e-7)
    assert (out - reference).abs().max().item() < 1e-4
    many = torch.exp(torch.linspace(math.log(10.0), math.log(0.05), 30, dtype=torch.float64))
    same = sample_dpm_adaptive(gaussian_denoiser, X_T.clone(), many, order=2, rtol=1e-6, atol=1e-7)
    assert torch.equal(out, same)  # only the ends of sigmas count


def test_a_batch_image_is_the_image_alone_with_its_seed():
    """Per-image step sizes and noise: ldm-eval's batches make each (prompt, seed)'s own image (k-diffusion sizes one
    step for the whole batch from the batch's error norm)."""
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    x[1] *= 0.05  # a row the error control treats very differently from the others
    sigmas = _range(10.0, 0.05)
    for options in ({}, {"eta": 1.0, "s_noise": 0.9}):
        batch = sample_dpm_adaptive(gaussian_denoiser, x.clone(), sigmas, generator=ImageGenerators([5, 6, 7]),
                                    **options)
        for k in range(3):
            alone = sample_dpm_adaptive(gaussian_denoiser, x[k:k + 1].clone(), sigmas,
                                        generator=ImageGenerators([5 + k]), **options)
            assert torch.equal(alone, batch[k:k + 1]), (options, k)
    batch = sample_dpm_fast(gaussian_denoiser, x.clone(), _range(10.0, 0.05, 7), eta=1.0,
                            generator=ImageGenerators([5, 6, 7]))
    alone = sample_dpm_fast(gaussian_denoiser, x[2:].clone(), _range(10.0, 0.05, 7), eta=1.0,
                            generator=ImageGenerators([7]))
    assert torch.equal(alone, batch[2:])


def test_eta_adds_seeded_noise_and_callbacks_report_progress():
    sigmas = _range(10.0, 0.05, 9)
    a = sample_dpm_fast(gaussian_denoiser, X_T.clone(), sigmas, eta=1.0, generator=torch.Generator().manual_seed(1))
    b = sample_dpm_fast(gaussian_denoiser, X_T.clone(), sigmas, eta=1.0, generator=torch.Generator().manual_seed(1))
    c = sample_dpm_fast(gaussian_denoiser, X_T.clone(), sigmas, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and (a - c).abs().max() > 0.01
    _, seen = _nfe(sample_dpm_adaptive, X_T.view(1, 9).clone(), _range(10.0, 0.05))  # one image: one step a call
    reported = [s["sigma"] for s in seen]
    assert reported == sorted(reported, reverse=True) and reported[-1] == pytest.approx(0.05)
    assert seen[-1]["n_accept"] + seen[-1]["n_reject"] == len(seen) and seen[-1]["nfe"] == 3 * len(seen)


def test_the_plan_is_the_models_whole_sigma_range_and_steps_is_dpm_fasts_budget():
    plan = sampling_plan(ScheduleConfig(), "dpm_fast", 10)
    sigmas = plan.sigmas.tolist()
    assert len(sigmas) == 11 and sigmas[-1] > 0  # no final 0: the sampler ends at sigma_min
    assert sigmas[0] == pytest.approx(14.6146, rel=1e-4) and sigmas[-1] == pytest.approx(0.02917, rel=1e-3)
    assert plan.init_noise_scale == sigmas[0] and plan.final_scale == 1.0
    # whatever the config's spacing: A1111 passes the model's sigma range
    leading = sampling_plan(ScheduleConfig(timestep_spacing="leading", steps_offset=1), "dpm_adaptive", 10)
    assert torch.equal(leading.sigmas, plan.sigmas)
    calls = []
    run_sampler("dpm_fast", lambda x, s, c: calls.append(s) or gaussian_denoiser(x, s), X_T.clone(), plan)
    assert len(calls) == 10


def test_a_stiff_problem_stops_at_max_nfe_with_the_way_out():
    """Strong classifier-like guidance at a large sigma: the steps stay tiny; an error, not an endless run."""

    def stiff(x, sigma, cond=None):
        return gaussian_denoiser(x, sigma) - 0.1 * sigma.view(-1, 1) ** 2 * x

    with pytest.raises(LdmError, match=r"dpm_adaptive stopped after 60 model evaluations \(max_nfe\) at sigma .* on its "
                                       r"way from 2e\+04 to 0.05.*Loosen rtol / atol, raise max_nfe, or use dpm_fast"):
        sample_dpm_adaptive(stiff, X_T.clone() * 2000, _range(20000.0, 0.05), max_nfe=60)


@pytest.mark.parametrize("options, message", [
    ({"order": 4}, "order=4 is not 2 or 3"),
    ({"order": 1}, "order=1 is not 2 or 3"),
    ({"icoeff": 0.0}, r"pcoeff \+ icoeff \+ dcoeff = 0 is not positive"),
    ({"atol": 0.0}, r"atol=0 is out of range: atol lies in \(0, inf\)"),
    ({"rtol": -0.1}, r"rtol=-0.1 is out of range"),
    ({"h_init": 0.0}, r"h_init=0 is out of range"),
    ({"accept_safety": 1.5}, r"accept_safety=1.5 is out of range: accept_safety lies in \(0, 1\]"),
    ({"s_churn": 1.0}, "unknown sampler option 's_churn'; sampler 'dpm_adaptive' takes order"),
])
def test_bad_adaptive_options_are_refused_with_the_reason(options, message):
    with pytest.raises(ConfigError, match=message):
        check_sampler_options("dpm_adaptive", options)
    assert check_sampler_options("dpm_adaptive", {"rtol": 0.01, "order": 2.0}) == {"rtol": 0.01, "order": 2}


# --- against k-diffusion 0.1.1.post1 (tools/parity_kdiffusion.py), where it is importable -----------------------------

KD_CASES = [("dpm_fast", "sample_dpm_fast", {}, None), ("dpm_fast", "sample_dpm_fast", {"eta": 0.5}, "fresh"),
            ("dpm_adaptive", "sample_dpm_adaptive", {}, None),
            ("dpm_adaptive", "sample_dpm_adaptive", {"order": 2, "rtol": 0.01, "atol": 0.001}, None),
            ("dpm_adaptive", "sample_dpm_adaptive", {"eta": 1.0, "pcoeff": 0.3, "dcoeff": 0.1}, "fresh")]


@pytest.fixture(scope="module")
def parity():
    if "k_diffusion.sampling" not in sys.modules and importlib.util.find_spec("k_diffusion") is None:
        pytest.skip("k-diffusion is not importable (pip install --target DIR --no-deps k-diffusion; PYTHONPATH=DIR)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import parity_kdiffusion

    return parity_kdiffusion, parity_kdiffusion.load_kdiffusion_sampling()


@pytest.mark.parametrize("case", KD_CASES, ids=[f"{c[0]}-{c[2]}" for c in KD_CASES])
def test_k_diffusion_gives_the_same_sample(parity, case):
    tool, kd = parity
    sigmas = sampling_plan(ScheduleConfig(), "dpm_fast", 12).sigmas.double()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * sigmas[0]
    denoiser = tool.ConvDenoiser(dtype=torch.float64).eval()
    rel, scale = tool.run_case(kd, *case, denoiser, sigmas, x)
    assert scale > 0.5 and rel < 1e-12, rel

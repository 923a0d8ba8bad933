"""Loss weightings against each paper's own objective, sigma samplers, offset noise and the hybrid (L_vlb) loss."""
import math

import pytest
import torch

from ldm.diffusion import (
    DiscreteDenoiser,
    DiscreteSchedule,
    DiscreteSigmaSampler,
    EDMDenoiser,
    EDMScaling,
    EDMWeighting,
    LogNormalSigmaSampler,
    MinSNRWeighting,
    ScheduleConfig,
    add_noise,
    denoising_loss,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    normal_kl,
    vlb_term,
)
from ldm.diffusion.learned_variance import first_step_log_beta_tilde, interpolate_log_variance


class TinyNet(torch.nn.Module):
    def __init__(self, out_channels=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, out_channels, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * torch.cos(t / 400).view(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule.from_config(ScheduleConfig())


def _diffusers_style(net, schedule, x0, noise, t):
    """The VP training step: x_t = sqrt(a) x0 + sqrt(1 - a) eps; returns (model output, eps, v targets)."""
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0  # Salimans & Ho 2022; diffusers' get_velocity
    return net(x_t, t.float()), noise, v


def test_eps_and_v_weightings_are_the_eps_and_v_mse(schedule):
    torch.manual_seed(0)
    net = TinyNet()
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([10, 400, 990])
    sigma = schedule.sigmas[t]
    out, eps, v = _diffusers_style(net, schedule, x0, noise, t)
    eps_loss = denoising_loss(DiscreteDenoiser(net, schedule, "epsilon"), x0, sigma, None, "eps", noise=noise)
    torch.testing.assert_close(eps_loss, (out - eps).pow(2).mean((1, 2, 3)), rtol=1e-4, atol=1e-6)
    v_loss = denoising_loss(DiscreteDenoiser(net, schedule, "v_prediction"), x0, sigma, None, "v", noise=noise)
    torch.testing.assert_close(v_loss, (out - v).pow(2).mean((1, 2, 3)), rtol=1e-4, atol=1e-6)
    x0_loss = denoising_loss(DiscreteDenoiser(net, schedule, "sample"), x0, sigma, None, "x0", noise=noise)
    torch.testing.assert_close(x0_loss, (out - x0).pow(2).mean((1, 2, 3)), rtol=1e-4, atol=1e-6)


def test_edm_weighting_is_table_1_and_gives_the_unit_target_loss():
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    expected = torch.tensor([(s**2 + 0.25) / (s * 0.5) ** 2 for s in (0.002, 0.5, 3.0, 80.0)], dtype=torch.float64)
    torch.testing.assert_close(EDMWeighting(0.5)(sigma), expected)
    c_skip, c_out, c_in, c_noise = EDMScaling(0.5)(sigma)  # Table 1, entry by entry
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (0.25 + sigma**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (0.25 + sigma**2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # lambda c_out^2 = 1: the weighted x0 loss is the plain MSE against the effective target (eq. 8).
    torch.manual_seed(0)
    net = TinyNet()
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    s = sigma.float()
    loss = denoising_loss(EDMDenoiser(net), x0, s, None, EDMWeighting(0.5), noise=noise)
    c_skip, c_out, c_in, c_noise = (c.float().view(-1, 1, 1, 1) for c in EDMScaling(0.5)(s))
    x = x0 + s.view(-1, 1, 1, 1) * noise
    target = (x0 - c_skip * x) / c_out
    torch.testing.assert_close(loss, (net(c_in * x, c_noise.flatten()) - target).pow(2).mean((1, 2, 3)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_matches_hang_et_al_and_is_finite_at_zero_snr(prediction):
    schedule = DiscreteSchedule.from_config(ScheduleConfig(rescale_betas_zero_snr=True))
    torch.manual_seed(0)
    net = TinyNet()
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([5, 300, 999])
    out, eps, v = _diffusers_style(net, schedule, x0, noise, t)
    snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
    gamma = torch.full_like(snr, 5.0)
    if prediction == "epsilon":
        expected = torch.minimum(snr, gamma) / snr * (out - eps).pow(2).mean((1, 2, 3))
    else:
        expected = torch.minimum(snr, gamma) / (snr + 1) * (out - v).pow(2).mean((1, 2, 3))
    denoiser = DiscreteDenoiser(net, schedule, prediction)
    loss = denoising_loss(denoiser, x0, schedule.sigmas[t], None, MinSNRWeighting(5.0), noise=noise)
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=1e-6)
    assert torch.isfinite(loss).all()
    weight = MinSNRWeighting(5.0)(torch.tensor([0.1, 1.0, float("inf")]))
    assert weight.tolist() == [5.0, 1.0, 0.0]  # min(SNR, gamma), 0 at SNR = 0


def test_sigma_samplers(schedule):
    g = torch.Generator().manual_seed(0)
    sigmas = DiscreteSigmaSampler(schedule)(5000, generator=g)
    assert torch.isin(sigmas, schedule.sigmas).all()
    t = schedule.sigma_to_t(sigmas)
    assert abs(t.mean().item() - 499.5) < 15 and t.min() < 10 and t.max() > 990  # uniform over 0..999
    log_sigma = LogNormalSigmaSampler(-1.2, 1.2)(20000, generator=g).log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.03 and abs(log_sigma.std().item() - 1.2) < 0.03


def test_offset_noise():
    x0 = torch.zeros(2, 3, 4, 4)
    x, noise = add_noise(x0, torch.tensor([2.0, 2.0]), offset_noise=0.1, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 3, 4, 4, generator=g)
    expected = base + 0.1 * torch.randn(2, 3, 1, 1, generator=g)  # Guttenberg 2023: per-channel constant shift
    torch.testing.assert_close(noise, expected)
    torch.testing.assert_close(x, 2.0 * expected)


def test_vlb_pieces():
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([0.1, 0.5])
    lv1, lv2 = torch.tensor([-1.0, 0.2]), torch.tensor([0.4, -0.3])
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    # The 256 bins of the discretized Gaussian hold all the probability mass.
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    probs = discretized_gaussian_log_likelihood(bins, torch.tensor(0.2, dtype=torch.float64),
                                                torch.tensor(math.log(0.3), dtype=torch.float64)).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-9)
    v = torch.tensor([-1.0, 1.0, 0.0])
    lb, lbt = torch.tensor(-2.0), torch.tensor(-6.0)
    assert interpolate_log_variance(v, lb, lbt).tolist() == [-6.0, -2.0, -4.0]  # eq. 15 ends and midpoint


def test_vlb_term_is_the_vp_kl_of_improved_ddpm(schedule):
    """L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) with VP means and variances (Nichol & Dhariwal 2021)."""
    torch.manual_seed(0)
    x0, x0_pred, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4) * 0.5, torch.randn(2, 3, 4, 4)
    v = torch.rand(2, 3, 4, 4) * 2 - 1
    t = torch.tensor([600, 37])
    ac = schedule.alphas_cumprod.double()
    a, a_prev = ac[t].view(-1, 1, 1, 1), ac[t - 1].view(-1, 1, 1, 1)
    beta = 1 - a / a_prev
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    coef0, coef1 = a_prev.sqrt() * beta / (1 - a), (1 - beta).sqrt() * (1 - a_prev) / (1 - a)
    var = beta * (1 - a_prev) / (1 - a)
    log_var_model = (v + 1) / 2 * beta.log() + (1 - v) / 2 * var.log()
    kl = normal_kl(coef0 * x0 + coef1 * x_t, var.log(), coef0 * x0_pred + coef1 * x_t, log_var_model)
    expected = kl.mean((1, 2, 3)) / math.log(2)
    sigma = schedule.sigmas[t].double()
    x = x_t / a.sqrt()
    ours = vlb_term(x0.double(), x, x0_pred.double(), v.double(), sigma, schedule.sigma_prev(t), 0.0)
    torch.testing.assert_close(ours, expected.float().double(), rtol=1e-4, atol=1e-7)


def test_hybrid_loss_stops_the_gradient_of_the_mean(schedule):
    torch.manual_seed(0)
    net = TinyNet(out_channels=6)
    denoiser = DiscreteDenoiser(net, schedule, "epsilon")
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    sigma = schedule.sigmas[torch.tensor([0, 250])]  # t = 0 uses the decoder NLL
    noise = torch.randn(2, 3, 8, 8)
    loss = hybrid_loss(denoiser, x0, sigma, noise=noise)
    simple = denoising_loss(denoiser, x0, sigma, noise=noise)
    assert torch.isfinite(loss).all() and (loss > simple).all()
    grad_eps_hybrid = torch.autograd.grad(loss.sum(), net.conv.weight)[0][:3]
    grad_eps_simple = torch.autograd.grad(simple.sum(), net.conv.weight)[0][:3]
    torch.testing.assert_close(grad_eps_hybrid, grad_eps_simple)  # the vlb term does not train the mean
    loss = hybrid_loss(denoiser, x0, sigma, noise=noise)
    assert torch.autograd.grad(loss.sum(), net.conv.weight)[0][3:].abs().sum() > 0  # it trains the variance
    assert first_step_log_beta_tilde(schedule.alphas_cumprod) < math.log(float(1 - schedule.alphas_cumprod[0]))

"""Classifier-free guidance (with rescale), dynamic thresholding and classifier guidance."""
import math

import pytest
import torch
from helpers import assert_close_to_ref

from ldm.diffusion import DiscreteDenoiser, DiscreteSchedule, ScheduleConfig, cfg, classifier_grad, classifier_guidance
from ldm.diffusion import dynamic_threshold, sample_ddpm


class CondNet(torch.nn.Module):
    """A tiny eps / v network whose output depends on x, t and the `context` keyword argument; counts its calls."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.calls = []

    def forward(self, x, t, context=None, mask=None):
        self.calls.append(x.shape[0])
        out = self.conv(x) * torch.cos(t / 300).view(-1, 1, 1, 1)
        return out + context.view(-1, 3, 1, 1) * (mask.view(-1, 1, 1, 1) if mask is not None else 1)


def _conds(b=2):
    g = torch.Generator().manual_seed(3)
    cond = {"context": torch.randn(b, 3, generator=g), "mask": torch.ones(b)}
    uncond = {"context": torch.randn(b, 3, generator=g), "mask": torch.ones(b)}
    return {"cond": cond, "uncond": uncond}


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule.from_config(ScheduleConfig())


def test_cfg_scale_one_is_the_conditional_denoiser_in_one_batched_call(schedule):
    net = CondNet()
    denoiser = DiscreteDenoiser(net, schedule, "epsilon")
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 0.5])
    cond = _conds()
    guided = cfg(denoiser, 1.0)(x, sigma, cond)
    assert net.calls == [4]  # [uncond, cond] in one forward
    torch.testing.assert_close(guided, denoiser(x, sigma, cond["cond"]), atol=1e-5, rtol=1e-5)
    # and at scale 5: x0_u + 5 (x0_c - x0_u), with uncond first in the batch
    x0_u, x0_c = denoiser(x, sigma, cond["uncond"]), denoiser(x, sigma, cond["cond"])
    torch.testing.assert_close(cfg(denoiser, 5.0)(x, sigma, cond), x0_u + 5 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_guidance_rescale_matches_diffusers(schedule, prediction):
    """diffusers rescales the eps / v output (rescale_noise_cfg); ours does the same on the x0-equivalent."""
    guider_utils = pytest.importorskip("diffusers.guiders.guider_utils")  # (its SD pipeline's copy imports slowly)
    net = CondNet()
    denoiser = DiscreteDenoiser(net, schedule, prediction)
    cond = _conds()
    t = torch.tensor([500, 40])
    sigma = schedule.sigmas[t]
    x = torch.randn(2, 3, 8, 8) * (1 + sigma**2).sqrt().view(-1, 1, 1, 1)
    # diffusers' loop: model output on the VP input, guidance, rescale, then x0 from the guided output.
    x_vp = x / (1 + sigma**2).sqrt().view(-1, 1, 1, 1)
    with torch.no_grad():
        out_u, out_c = net(x_vp, t.float(), **cond["uncond"]), net(x_vp, t.float(), **cond["cond"])
        out = guider_utils.rescale_noise_cfg(out_u + 7.5 * (out_c - out_u), out_c, guidance_rescale=0.7)
        a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        if prediction == "epsilon":
            x0_ref = (x_vp - (1 - a).sqrt() * out) / a.sqrt()
        else:
            x0_ref = a.sqrt() * x_vp - (1 - a).sqrt() * out
        ours = cfg(denoiser, 7.5, rescale=0.7)(x, sigma, cond)
        plain = cfg(denoiser, 7.5)(x, sigma, cond)
    assert (plain - x0_ref).abs().max() > 1e-2  # the rescale changes the result
    assert_close_to_ref(ours, x0_ref)


def test_dynamic_threshold_matches_imagen_and_diffusers():
    diffusers = pytest.importorskip("diffusers")
    x0 = torch.randn(3, 3, 8, 8) * torch.tensor([0.3, 2.0, 5.0]).view(3, 1, 1, 1)
    thresholded = dynamic_threshold(lambda x, sigma, cond: x0, percentile=0.9)(x0, torch.ones(3), None)
    scheduler = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1e9)
    torch.testing.assert_close(thresholded, scheduler._threshold_sample(x0))
    torch.testing.assert_close(thresholded[0], x0[0].clamp(-1, 1))  # quantile < 1: s = 1, plain clipping
    s = torch.quantile(x0[2].abs().flatten(), 0.9)
    torch.testing.assert_close(thresholded[2], x0[2].clamp(-s, s) / s)
    assert thresholded.abs().max() <= 1.0


def test_guidance_wrappers_keep_the_learned_variance(schedule):
    class VarNet(torch.nn.Module):
        def forward(self, x, t, context=None, mask=None):
            return torch.cat([x * 0.1 + context.view(-1, 3, 1, 1), torch.tanh(x + context.view(-1, 3, 1, 1))], 1)

    denoiser = DiscreteDenoiser(VarNet(), schedule, "epsilon")
    cond = _conds()
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([2.0, 2.0])
    guided = dynamic_threshold(cfg(denoiser, 3.0), percentile=0.99)
    x0, v = guided.forward_with_variance(x, sigma, cond)
    x_in = x / math.sqrt(1 + 2.0**2)  # the network sees the VP input
    torch.testing.assert_close(v, torch.tanh(x_in + cond["cond"]["context"].view(-1, 3, 1, 1)))  # the cond half
    assert x0.abs().max() <= 1.0
    out = sample_ddpm(guided, x * 5, torch.tensor([5.0, 1.0, 0.0]), cond, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


def test_classifier_guidance_turns_the_mixture_denoiser_into_the_class_denoiser():
    """Data = 1/2 N(-1, s^2) + 1/2 N(+1, s^2); the exact noisy classifier's gradient (scale 1) gives class 1's D."""
    s2 = 0.3**2

    def class_denoiser(x, sigma, m):
        return m + s2 / (s2 + sigma**2) * (x - m)

    def log_lik(x, sigma, m):  # log N(x; m, s^2 + sigma^2) up to a constant shared by both classes
        return -((x - m) ** 2) / (2 * (s2 + sigma**2))

    def mixture_denoiser(x, sigma, cond=None):
        sig = sigma.view(-1, 1)
        w1 = torch.sigmoid(log_lik(x, sig, 1.0) - log_lik(x, sig, -1.0))
        return w1 * class_denoiser(x, sig, 1.0) + (1 - w1) * class_denoiser(x, sig, -1.0)

    def classifier(x, sigma):  # logits of the Bayes-optimal noisy classifier, shape (b, 2)
        sig = sigma.view(-1, 1)
        return torch.cat([log_lik(x, sig, -1.0), log_lik(x, sig, 1.0)], dim=1)

    x = torch.linspace(-3, 3, 13, dtype=torch.float64).view(13, 1)
    for sigma_value in (0.2, 1.0, 4.0):
        sigma = torch.full((13,), sigma_value, dtype=torch.float64)
        guided = classifier_guidance(mixture_denoiser, classifier_grad(classifier, torch.ones(13, dtype=torch.long)))
        torch.testing.assert_close(guided(x, sigma), class_denoiser(x, sigma.view(-1, 1), 1.0))
    assert not math.isclose(float(mixture_denoiser(x, sigma)[0]), float(class_denoiser(x[0], 4.0, 1.0)))

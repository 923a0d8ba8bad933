"""Conditioning helpers: text embeddings as network arguments (mask always), concatenated input channels."""
import torch

from ldm.diffusion.conditioning import ConcatNetwork, add_conditioning, text_conditioning
from ldm.diffusion.guidance import cfg
from ldm.models.text_encoders import TextEmbeddings


def test_text_conditioning_always_carries_the_mask_and_pooled_only_when_asked():
    tokens, pooled = torch.randn(2, 5, 8), torch.randn(2, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    cond = text_conditioning(TextEmbeddings(tokens, pooled, mask), pooled=False)
    assert set(cond) == {"context", "context_mask"} and torch.equal(cond["context_mask"], mask)
    assert torch.equal(text_conditioning(TextEmbeddings(tokens, pooled, mask), pooled=True)["y"], pooled)


class Recorder(torch.nn.Module):
    """A 'network' that returns its input's first 2 channels plus the sum of the rest (to see what it was fed)."""

    def forward(self, x, t, context=None):
        shift = 0 if context is None else context[:, 0, 0, None, None, None]  # per sample
        return x[:, :2] + x[:, 2:].sum(dim=1, keepdim=True) + shift


def test_concat_network_feeds_the_extra_channels_beside_x_in_both_guidance_halves():
    net = ConcatNetwork(Recorder())
    x, t = torch.randn(3, 2, 4, 4), torch.zeros(3)
    extra = torch.randn(3, 3, 4, 4, dtype=torch.float64)  # cast to x's dtype
    torch.testing.assert_close(net(x, t, concat=extra), x + extra.float().sum(dim=1, keepdim=True))
    torch.testing.assert_close(net(x, t), x)

    ctx_c, ctx_u = torch.ones(3, 1, 1), torch.zeros(3, 1, 1)
    cond = add_conditioning({"cond": {"context": ctx_c}, "uncond": {"context": ctx_u}}, concat=extra)
    assert cond["cond"]["concat"] is extra and cond["uncond"]["concat"] is extra

    def denoiser(x, sigma, cond):  # an x0-predictor built on the network
        return net(x, sigma, **cond)

    guided = cfg(denoiser, 3.0)(x, torch.ones(3), cond)
    base = x + extra.float().sum(dim=1, keepdim=True)
    torch.testing.assert_close(guided, base + 3.0 * 1.0)  # uncond adds 0, cond 1: u + 3 (c - u)
    assert add_conditioning({"context": ctx_c}, concat=extra)["concat"] is extra

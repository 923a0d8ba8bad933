import math

import pytest
import torch

from ldm.diffusion import build_denoiser, cfg, dynamic_threshold, karras_sigmas, sample_euler
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import ConfigError
from ldm.models.efficient_unet import EfficientUNet, EfficientUNetConfig, masked_mean
from ldm.models.transformer import SpatialTransformer
from ldm.models.unet_blocks import Downsample, ResBlock, Upsample

CONTEXT_DIM = 32
TINY_SR = {"in_channels": 6, "out_channels": 3, "model_channels": 32, "channel_mult": (1, 2, 2),
           "num_res_blocks": (1, 2, 3), "attention_levels": (2,), "cross_attention_levels": (1, 2),
           "num_head_channels": 16, "context_dim": CONTEXT_DIM, "aug_level_conditioning": True}


def _network(**overrides) -> EfficientUNet:
    """A tiny network whose zero-initialised output layers get realistic random weights (zeros would hide bugs)."""
    torch.manual_seed(0)
    net = EfficientUNet(EfficientUNetConfig(**{**TINY_SR, **overrides})).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, p[0].numel() ** -0.5)  # std 1/sqrt(fan_in), the scale of the default init
    return net


def _inputs(batch=2, size=16, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 6, size, size, generator=g)
    context = torch.randn(batch, tokens, CONTEXT_DIM, generator=g)
    return x, torch.tensor([10.0, 700.5])[:batch], context


def _close(a, b, rel=1e-5):
    return (a - b).abs().max().item() <= rel * b.abs().max().item() + 1e-6


def test_shapes_sr_and_base():
    net = _network()
    x, t, context = _inputs()
    with torch.no_grad():
        out = net(x, t, context, aug_level=torch.tensor([0.0, 0.3]))
    assert out.shape == (2, 3, 16, 16)
    assert out.abs().max() > 0.01
    base = _network(in_channels=3, aug_level_conditioning=False, downsample_first_level=False)
    with torch.no_grad():
        out = base(torch.randn(1, 3, 8, 8), 5.0, context[:1])
    assert out.shape == (1, 3, 8, 8)


def _kinds(block):
    return [type(layer).__name__ for layer in block]


def test_block_counts_and_order_downsample_first_upsample_last():
    net = _network()
    blocks = EfficientUNetConfig(**TINY_SR).blocks_per_level
    for level, block in enumerate(net.down_blocks):
        assert isinstance(block[0], Downsample)  # SR stage: every level, the first included, downsamples first
        assert sum(isinstance(layer, ResBlock) for layer in block) == blocks[level]
        assert not any(isinstance(layer, Upsample) for layer in block)
    for level, block in zip(reversed(range(3)), net.up_blocks):
        assert isinstance(block[-1], Upsample)  # ... and every up level upsamples last
        assert isinstance(block[0], ResBlock)
        assert sum(isinstance(layer, ResBlock) for layer in block) == blocks[level]
    assert _kinds(net.down_blocks[2]) == ["Downsample", "ResBlock", "ResBlock", "ResBlock", "SpatialTransformer"]
    assert _kinds(net.up_blocks[0]) == ["ResBlock", "ResBlock", "ResBlock", "SpatialTransformer", "Upsample"]
    # channels: the downsampling conv changes the width, the upsampling conv returns to the level above's width
    assert net.down_blocks[1][0].op.out_channels == 64 and net.up_blocks[-1][-1].conv.out_channels == 32

    base = _network(downsample_first_level=False, aug_level_conditioning=False)
    assert isinstance(base.down_blocks[0][0], ResBlock) and isinstance(base.down_blocks[1][0], Downsample)
    assert not any(isinstance(layer, Upsample) for layer in base.up_blocks[-1])


def test_resolution_of_each_level():
    net = _network()
    sizes = []
    hooks = [block.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for block in net.down_blocks]
    x, t, context = _inputs()
    with torch.no_grad():
        net(x, t, context, aug_level=0.1)
    for h in hooks:
        h.remove()
    assert sizes == [8, 4, 2]  # downsample first: level 0 already runs at half the input size


def test_residual_skips_scaled_by_inverse_sqrt2():
    net = _network()
    res_blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert res_blocks and all(m.skip_scale == 2 ** -0.5 for m in res_blocks)
    # the scale multiplies shortcut + branch: same weights with skip_scale 1 give exactly sqrt(2) times less
    block = net.down_blocks[2][1]
    unscaled = ResBlock(64, 128, out_channels=64)
    unscaled.load_state_dict(block.state_dict())
    h, emb = torch.randn(2, 64, 4, 4), torch.randn(2, 128)
    with torch.no_grad():
        expected = (unscaled.skip_connection(h) + unscaled.out_layers(
            unscaled.in_layers(h) + unscaled.emb_layers(emb)[:, :, None, None])) / math.sqrt(2)
        assert _close(block(h, emb), expected)
        assert _close(block(h, emb) * math.sqrt(2), unscaled(h, emb))


def _transformers(module):
    return [m for m in module.modules() if isinstance(m, SpatialTransformer)]


def test_attention_only_at_named_levels():
    net = _network()
    for level, block in enumerate(net.down_blocks):
        found = _transformers(block)
        assert len(found) == (1 if level in (1, 2) else 0)
        for t in found:
            block0 = t.transformer_blocks[0]
            assert hasattr(block0, "attn1") == (level == 2)  # self-attention only at level 2
            assert hasattr(block0, "attn2")  # text cross-attention at levels 1 and 2
    up_levels = [list(reversed(range(3)))[i] for i, b in enumerate(net.up_blocks) if _transformers(b)]
    assert up_levels == [2, 1]
    # the 1024 px stage: no self-attention anywhere, text cross-attention kept
    no_self = _network(attention_levels=())
    blocks = [b for t in _transformers(no_self) for b in t.transformer_blocks]
    assert blocks and not any(hasattr(b, "attn1") for b in blocks) and all(hasattr(b, "attn2") for b in blocks)


def test_aug_level_reaches_network_unrounded():
    net = _network()
    x, t, context = _inputs()
    with torch.no_grad():
        fractional = net(x, t, context, aug_level=torch.tensor([0.25, 0.25]))
        rounded = net(x, t, context, aug_level=torch.tensor([0.0, 0.0]))
        nearby = net(x, t, context, aug_level=torch.tensor([0.26, 0.26]))
        as_float = net(x, t, context, aug_level=0.25)
    # imagen-pytorch once cast the level to long: 0.25 became 0 and SR stages saw no augmentation at sampling
    assert (fractional - rounded).abs().max() > 1e-3 * fractional.abs().max()
    assert (fractional - nearby).abs().max() > 1e-4 * fractional.abs().max()
    assert torch.equal(fractional, as_float)
    with pytest.raises(ValueError, match="aug_level"):
        net(x, t, context)


def test_text_conditioning_changes_output_and_mask_hides_padding():
    net = _network()
    x, t, context = _inputs()
    mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
    garbage = context.clone()
    garbage[:, 3:] = 100.0  # whatever sits at masked positions must not matter
    with torch.no_grad():
        a = net(x, t, context, mask, aug_level=0.2)
        b = net(x, t, garbage, mask, aug_level=0.2)
        c = net(x, t, context, aug_level=0.2)
    assert _close(a, b)
    assert (a - c).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_t5_padding_invariance_77_vs_128(pooling):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=CONTEXT_DIM, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                 relative_attention_num_buckets=8, dropout_rate=0.0)).eval()
    prompt = [[17, 5, 33, 9, 1], [8, 21, 1, 0, 0]]  # token ids ending in </s> (id 1); 0 pads the second

    def encode(length):
        ids = torch.zeros(2, length, dtype=torch.long)
        for i, row in enumerate(prompt):
            ids[i, :len(row)] = torch.tensor(row)
        mask = ids != 0
        mask[:, 0] = True
        with torch.no_grad():
            tokens = t5(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return tokens * mask[..., None], mask  # as T5TextEncoder zeroes padded positions

    net = _network(text_pooling=pooling)
    x, t, _ = _inputs()
    with torch.no_grad():
        out77 = net(x, t, *encode(77), aug_level=0.3)
        out128 = net(x, t, *encode(128), aug_level=0.3)
    assert out77.abs().max() > 0.01
    assert _close(out128, out77)


def test_masked_mean_ignores_padding():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]]])
    assert torch.equal(masked_mean(tokens, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 3.0]]))


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, context = _inputs()
    grads = []
    for enabled in (False, True):
        net = _network()
        net.train()
        net.set_gradient_checkpointing(enabled)
        net(x, t, context, aug_level=0.5).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert _close(grads[1], grads[0])


def test_config_errors_and_wrong_inputs():
    with pytest.raises(ConfigError, match="num_res_blocks"):
        EfficientUNetConfig(**{**TINY_SR, "num_res_blocks": (1, 2)})
    with pytest.raises(ConfigError, match="levels \\[3\\]"):
        EfficientUNetConfig(**{**TINY_SR, "attention_levels": (3,)})
    with pytest.raises(ConfigError, match="context_dim"):
        EfficientUNetConfig(**{**TINY_SR, "context_dim": None})
    net = _network()
    x, t, context = _inputs()
    with pytest.raises(ValueError, match="multiple of 8"):
        net(x[..., :12, :12], t, context, aug_level=0.1)
    with pytest.raises(ValueError, match="`y`"):
        net(x, t, context, y=torch.zeros(2, 4), aug_level=0.1)
    with pytest.raises(ValueError, match="context"):
        net(x, t, aug_level=0.1)


def test_drives_the_denoiser_contract_with_guidance_and_thresholding():
    net = _network(in_channels=3)
    denoiser = build_denoiser(net, ScheduleConfig(beta_schedule="cosine", prediction_type="epsilon"))
    _, _, context = _inputs()
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    level = torch.full((2,), 0.25)
    cond = {"cond": {"context": context, "context_mask": mask, "aug_level": level},
            "uncond": {"context": torch.zeros_like(context), "context_mask": mask, "aug_level": level}}
    guided = dynamic_threshold(cfg(denoiser, 4.0), percentile=0.9)
    sigmas = karras_sigmas(3, denoiser.sigma_min, denoiser.sigma_max)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = sample_euler(guided, torch.randn(2, 3, 16, 16, generator=g) * sigmas[0], sigmas, cond)
    # Euler's last step lands on the thresholded x0: in [-1, 1], the bound reached by the clipped 10%
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    assert x.abs().max() <= 1.0 + 1e-6 and x.abs().amax(dim=(1, 2, 3)).min() > 0.99

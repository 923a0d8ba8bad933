import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import assert_close_to_ref, realistic_weights

from ldm.config import from_dict
from ldm.errors import ConfigError
from ldm.io.keys_unet import unet_config_to_diffusers, unet_diffusers_to_original
from ldm.models import unet_blocks
from ldm.models.attention import attention_backend
from ldm.models.unet import UNetConfig, UNetModel

TINY = {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "context_dim": 32}
SD1_TINY = UNetConfig(**TINY, attention_resolutions=(2, 1), num_heads=2)
SD2_TINY = UNetConfig(**{**TINY, "context_dim": 24}, attention_resolutions=(2, 1), num_heads=-1, num_head_channels=8,
                      use_linear_in_transformer=True)


def _pair(config):
    """A random diffusers UNet2DConditionModel and our UNetModel holding the same weights (strict load)."""
    # non-zero everywhere: the zero-initialised output convs would hide bugs
    ref = realistic_weights(UNet2DConditionModel.from_config(unet_config_to_diffusers(config))).eval()
    ours = UNetModel(config).eval()
    ours.load_state_dict(unet_diffusers_to_original(ref.state_dict(), config), strict=True)
    return ref, ours


def _inputs(config, batch=2, tokens=5):
    x = torch.randn(batch, config.in_channels, 16, 16)
    context = torch.randn(batch, tokens, config.context_dim)
    return x, context


def _assert_parity(config, t, y=None, class_labels=None):
    ref, ours = _pair(config)
    x, context = _inputs(config)
    with torch.no_grad():
        expected = ref(x, t, context, class_labels=class_labels).sample
        got = ours(x, t, context, y=y)
    assert_close_to_ref(got, expected)
    assert expected.abs().max().item() > 0.1  # a real signal, not zeros
    return ours, x, context, got


def test_parity_sd1_style():
    ours, x, context, got = _assert_parity(SD1_TINY, torch.tensor([10, 900]))
    # the comparison is sensitive: perturbing one cross-attention key projection changes the output
    with torch.no_grad():
        ours.middle_block[1].transformer_blocks[0].attn2.to_k.weight.add_(0.1)
        assert (ours(x, torch.tensor([10, 900]), context) - got).abs().max().item() > 1e-3


def test_parity_sd2_style_linear_projection():
    _assert_parity(SD2_TINY, torch.tensor([10, 900]))


def test_parity_transformer_depth_per_level():
    config = UNetConfig(**TINY, attention_resolutions=(2, 1), num_heads=2, transformer_depth=(1, 2))
    ours, *_ = _assert_parity(config, torch.tensor([10, 900]))
    assert len(ours.input_blocks[1][1].transformer_blocks) == 1
    assert len(ours.input_blocks[3][1].transformer_blocks) == 2
    assert len(ours.middle_block[1].transformer_blocks) == 2


def test_parity_pooled_embedding():
    config = UNetConfig(**TINY, attention_resolutions=(2,), num_heads=2, adm_in_channels=12)
    pooled = torch.randn(2, 12)
    ours, *_ = _assert_parity(config, torch.tensor([10, 900]), y=pooled, class_labels=pooled)
    assert "label_emb.0.0.weight" in ours.state_dict() and "label_emb.0.2.weight" in ours.state_dict()


def test_parity_class_labels():
    config = UNetConfig(**TINY, attention_resolutions=(2,), num_heads=2, num_classes=10)
    labels = torch.tensor([3, 7])
    ours, x, context, got = _assert_parity(config, torch.tensor([10, 900]), y=labels, class_labels=labels)
    with torch.no_grad():  # the label matters
        assert (ours(x, torch.tensor([10, 900]), context, y=torch.tensor([4, 7])) - got)[0].abs().max() > 1e-3
    with pytest.raises(ValueError, match="pass `y`"):
        ours(x, torch.tensor([10, 900]), context)


@pytest.mark.parametrize("t", [torch.tensor([0.5, 123.25]), torch.tensor(417.75), 417.75])
def test_parity_float_and_scalar_timesteps(t):
    _assert_parity(SD1_TINY, t)


def test_learn_sigma_doubles_output_channels():
    config = UNetConfig(**TINY, attention_resolutions=(2,), num_heads=2, learn_sigma=True)
    _, _, _, got = _assert_parity(config, torch.tensor([10, 900]))
    assert got.shape == (2, 8, 16, 16)


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    config = UNetConfig(**TINY, attention_resolutions=(2,), num_heads=2)
    _, plain = _pair(config)
    ckpt = UNetModel(UNetConfig(**{**TINY, "use_checkpoint": True}, attention_resolutions=(2,), num_heads=2))
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = unet_blocks.checkpoint
    monkeypatch.setattr(unet_blocks, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    x, context = _inputs(config)
    t = torch.tensor([10, 900])
    grads = []
    for model in (plain.train(), ckpt.train()):
        model.zero_grad()
        (model(x, t, context) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # 8 ResBlocks (2 down, 2 middle, 4 up) and 4 transformer blocks (1 down, 1 middle, 2 up)
    assert len(calls) == 8 + 4 and all(k == {"use_reentrant": False} for k in calls)
    for name, g in grads[0].items():
        assert_close_to_ref(grads[1][name], g, what=name)
    assert max(g.abs().max().item() for g in grads[0].values()) > 1e-3
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(x, t, context)
    assert calls == []  # only while training


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_context_mask_equals_unpadded_context(backend):
    _, ours = _pair(SD1_TINY)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    real = [torch.randn(1, 3, 32), torch.randn(1, 5, 32)]  # two prompts of 3 and 5 tokens
    padded = torch.randn(2, 8, 32) * 5  # padding tokens hold garbage
    padded[0, :3], padded[1, :5] = real[0][0], real[1][0]
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :3], mask[1, :5] = True, True
    with attention_backend(backend), torch.no_grad():
        masked = ours(x, t, padded, context_mask=mask)
        separate = torch.cat([ours(x[i:i + 1], t[i:i + 1], real[i]) for i in range(2)])
        unmasked = ours(x, t, padded)
    assert_close_to_ref(masked, separate)
    assert (unmasked - separate).abs().max().item() > 1e-2  # the padding would matter without the mask


@pytest.mark.slow
def test_compile_fullgraph_and_channels_last():
    _, ours = _pair(SD2_TINY)
    x, context = _inputs(SD2_TINY)
    t = torch.tensor([10.5, 900.0])
    with torch.no_grad():
        eager = ours(x, t, context)
        compiled = torch.compile(ours, backend="eager", fullgraph=True)(x, t, context)
        last = ours.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, context)
    assert_close_to_ref(compiled, eager)
    assert ours.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_ref(last, eager)


@pytest.mark.slow
def test_bfloat16_weights_run_and_stay_close():
    _, ours = _pair(SD1_TINY)
    x, context = _inputs(SD1_TINY)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ref = ours(x, t, context)
        half = ours.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert half.dtype == torch.bfloat16
    assert (half.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_no_cross_attention_when_context_dim_is_none():
    config = UNetConfig(**{**TINY, "context_dim": None}, attention_resolutions=(2,), num_heads=2)
    model = UNetModel(config).eval()
    keys = model.state_dict()
    assert not any(".attn2." in k or ".norm2." in k for k in keys if "transformer_blocks" in k)
    assert any(".attn1.to_q" in k for k in keys)
    with torch.no_grad():
        assert model(torch.randn(1, 4, 16, 16), torch.tensor([5])).shape == (1, 4, 16, 16)


def test_resampling_without_convolutions():
    config = UNetConfig(**TINY, attention_resolutions=(2,), num_heads=2, conv_resample=False)
    model = UNetModel(config).eval()
    keys = model.state_dict()
    assert "input_blocks.2.0.op.weight" not in keys and not any(".1.conv." in k for k in keys)
    assert len(keys) == len(UNetModel(UNetConfig(**TINY, attention_resolutions=(2,), num_heads=2)).state_dict()) - 4
    with torch.no_grad():
        assert model(torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.randn(1, 3, 32)).shape == (1, 4, 16, 16)


def test_config_validation_and_yaml_form():
    with pytest.raises(ConfigError, match="exactly one of num_heads"):
        UNetConfig(num_heads=-1, num_head_channels=-1)
    with pytest.raises(ConfigError, match="divisible by 32"):
        UNetConfig(model_channels=48)
    with pytest.raises(ConfigError, match="one entry per level"):
        UNetConfig(transformer_depth=(1, 2))
    with pytest.raises(ConfigError, match="label_emb"):
        UNetConfig(num_classes=3, adm_in_channels=8)
    with pytest.raises(ConfigError, match="split into heads"):
        UNetModel(UNetConfig(**TINY, attention_resolutions=(1,), num_heads=3))
    config = from_dict(UNetConfig, {"channel_mult": [1, 2, 4], "transformer_depth": [1, 2, 10],
                                    "attention_resolutions": [4, 2]})
    assert config.channel_mult == (1, 2, 4) and config.transformer_depth == (1, 2, 10)
    assert config.depth_per_level == (1, 2, 10) and UNetConfig().depth_per_level == (1, 1, 1, 1)

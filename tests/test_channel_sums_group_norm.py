"""GroupNorm from per-channel sums (`ldm.models.channel_sums_group_norm`): the same numbers as GroupNorm, eagerly the
plain GroupNorm itself, under torch.compile the channel-sums form, and the swap keeps every key."""
import pytest
import torch
import torch.nn.functional as F

from ldm.models.channel_sums_group_norm import (ChannelSumsGroupNorm, group_norm_channel_sums,
                                                use_channel_sums_group_norm)
from ldm.models.unet_blocks import GroupNorm32


def _nhwc(shape, mean, std, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape, groups, mean, std", [
    ((2, 64, 8, 8), 32, 0.0, 1.0),
    ((2, 640, 4, 4), 32, 3.0, 0.5),  # 20 channels a group, as the SD U-Net's 640-channel maps
    ((1, 960, 3, 5), 32, -2.0, 2.0),  # 30 a group, an odd map
    ((3, 40, 11, 13), 4, 1000.0, 0.5),  # a mean 2000x the spread: the shift keeps the squares from cancelling
    ((2, 64, 1, 1), 32, 0.5, 1.0),  # one pixel
])
def test_it_is_group_norm_in_float32(shape, groups, mean, std):
    x = _nhwc(shape, mean, std)
    g = torch.Generator().manual_seed(1)
    weight = 1 + 0.2 * torch.randn(shape[1], generator=g)
    bias = 0.2 * torch.randn(shape[1], generator=g)
    out = group_norm_channel_sums(x, groups, weight, bias, 1e-5)
    reference = F.group_norm(x.double(), groups, weight.double(), bias.double(), 1e-5)
    # float32 statistics of values stored to float32 (at 1000: a step of 6e-5, ~1.2e-4 of the spread)
    atol = 2e-3 if abs(mean) > 100 else 2e-5
    torch.testing.assert_close(out.double(), reference, atol=atol, rtol=atol)
    no_affine = group_norm_channel_sums(x, groups, None, None, 1e-5)
    torch.testing.assert_close(no_affine.double(), F.group_norm(x.double(), groups, eps=1e-5), atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rounds_once_as_groupnorm32_does(dtype):
    x = _nhwc((2, 320, 8, 8), 0.3, 1.5, dtype=dtype)
    norm = GroupNorm32(32, 320).to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    out = group_norm_channel_sums(x, 32, norm.weight, norm.bias, norm.eps)
    assert out.dtype == dtype
    exact = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
    step = torch.finfo(dtype).eps  # one rounding of the float32 result: within half a step, relative
    assert ((out.double() - exact).abs() / exact.abs().clamp_min(1e-2)).max() <= step
    plain = norm(x).double()
    assert ((out.double() - plain).abs() / exact.abs().clamp_min(1e-2)).max() <= 2 * step


def test_eagerly_it_is_the_plain_groupnorm_and_the_swap_keeps_every_key():
    net = torch.nn.Sequential(GroupNorm32(32, 64), torch.nn.SiLU(), torch.nn.Conv2d(64, 64, 3, padding=1),
                              GroupNorm32(32, 64))
    keys = {k: v.clone() for k, v in net.state_dict().items()}
    x = _nhwc((2, 64, 6, 6), 0.5, 1.0)
    before = net(x)
    assert use_channel_sums_group_norm(net) == 2
    assert all(type(m) is ChannelSumsGroupNorm for m in (net[0], net[3]))
    assert torch.equal(net(x), before)  # eagerly: PyTorch's own GroupNorm, bitwise
    assert net.state_dict().keys() == keys.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in keys.items())
    assert use_channel_sums_group_norm(net, False) == 2
    assert all(type(m) is GroupNorm32 for m in (net[0], net[3]))


def test_under_torch_compile_it_runs_the_channel_sums(monkeypatch):
    """Traced by torch.compile (channels_last), the norm computes from channel sums; an NCHW map keeps the plain
    GroupNorm. The eager backend shows what dynamo traced without inductor's minutes on this CPU."""
    from ldm.models import channel_sums_group_norm as module

    calls = []
    real = module.group_norm_channel_sums
    monkeypatch.setattr(module, "group_norm_channel_sums", lambda *a: calls.append(a[0].shape) or real(*a))
    net = torch.nn.Sequential(GroupNorm32(32, 64))
    use_channel_sums_group_norm(net)
    x = _nhwc((2, 64, 6, 6), -1.0, 2.0)
    compiled = torch.compile(net, backend="eager", dynamic=False)
    torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-5)
    assert calls == [x.shape]
    compiled(x.contiguous())  # NCHW: the plain GroupNorm (a recompile for the new layout)
    assert calls == [x.shape]


def test_inductor_compiles_it_to_the_same_numbers():
    """Inductor's own lowering (C++ on this CPU) of the channel-sums norm and a SiLU after it."""
    net = torch.nn.Sequential(GroupNorm32(32, 640), torch.nn.SiLU())
    torch.nn.init.normal_(net[0].weight, 1.0, 0.2)
    torch.nn.init.normal_(net[0].bias, 0.0, 0.2)
    x = _nhwc((2, 640, 4, 4), 2.0, 0.7)
    reference = net(x)
    use_channel_sums_group_norm(net)
    out = torch.compile(net, dynamic=False)(x)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=2e-5)

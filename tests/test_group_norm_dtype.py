"""GroupNorm32 in half precision: PyTorch's own kernel, without the explicit float32 casts, gives the float32 result
rounded once (to within one unit in the last place), in both memory layouts; mixed dtypes keep the casts."""
import pytest
import torch
import torch.nn.functional as F

from ldm.models.unet_blocks import GroupNorm32

EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # one ulp, relative to the magnitude


def _norm(channels: int, dtype: torch.dtype, seed: int) -> GroupNorm32:
    g = torch.Generator().manual_seed(seed)
    norm = GroupNorm32(32, channels)
    with torch.no_grad():  # a trained norm's affine map, not the identity it starts as
        norm.weight.copy_(1 + 0.3 * torch.randn(channels, generator=g))
        norm.bias.copy_(0.2 * torch.randn(channels, generator=g))
    return norm.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_group_norm_is_the_float32_result_rounded(dtype, channels_last):
    g = torch.Generator().manual_seed(1)
    norm = _norm(320, dtype, seed=2)
    x = (torch.randn(2, 320, 24, 24, generator=g) * 4 + 1.5).to(dtype)  # activation-scale input, non-zero mean
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = norm(x)
    reference = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)
    assert y.dtype == dtype and y.shape == x.shape
    scale = reference.abs().amax()
    assert (y.float() - reference).abs().amax() <= EPS[dtype] * scale
    assert torch.isfinite(y).all()


def test_mixed_dtypes_keep_the_explicit_casts():
    """fp32 parameters under a bf16 input (outside autocast) cannot go to the half kernel: the casts run."""
    g = torch.Generator().manual_seed(3)
    norm = _norm(64, torch.float32, seed=4)
    x = (torch.randn(2, 64, 8, 8, generator=g) * 2).to(torch.bfloat16)
    y = norm(x)
    reference = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference, rtol=0, atol=0)


def test_float32_is_plain_group_norm():
    g = torch.Generator().manual_seed(5)
    norm = _norm(64, torch.float32, seed=6)
    x = torch.randn(2, 64, 8, 8, generator=g) * 3
    torch.testing.assert_close(norm(x), F.group_norm(x, 32, norm.weight, norm.bias, norm.eps), rtol=0, atol=0)


def test_half_input_and_parameters_come_back_in_their_dtype_when_the_kernel_answers_in_float32(monkeypatch):
    """CUDA autocast's policy for group_norm is float32 (AT_FORALL_FP32): inside autocast, a bf16 model's norm got a
    float32 result back from the kernel. Simulated on the CPU (whose autocast keeps bf16) by a kernel that upcasts."""
    plain = F.group_norm
    monkeypatch.setattr(F, "group_norm", lambda x, g, w, b, eps: plain(x.float(), g, w.float(), b.float(), eps))
    norm = _norm(64, torch.bfloat16, seed=7)
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16

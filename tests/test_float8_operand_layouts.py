"""Every `torch._scaled_mm` call of `ldm.models.float8` follows CUDA's operand rules, which the CPU kernel does not
enforce (so a CPU test would not see a violation): A row-major, B column-major, the inner and output widths multiples
of 16, float32 scalar scales, never e5m2 x e5m2. Checked on every product of a forward and backward, including inputs
that arrive as strided views (SD-2's linear proj_in on a batch of one: `b c h w -> b (h w) c` of an NCHW map)."""
import pytest
import torch
from helpers import assert_close_to_ref, tiny_components

import ldm.models.float8 as float8
from ldm.models.float8 import E4M3, E5M2, Float8Linear, float8_linear, quantize, to_float8


def _dequant(x, dtype):
    x8, scale = quantize(x, dtype)
    return x8.float() * scale


@pytest.fixture
def products(monkeypatch):
    """The (A, B) operands of every FP8 product, each checked against CUDA's rules before the real call."""
    calls = []
    real = float8._mm

    def checked(a8, scale_a, b8, scale_b, out_dtype):
        assert a8.dim() == b8.dim() == 2 and a8.shape[1] == b8.shape[0]
        assert a8.stride(1) == 1 and a8.stride(0) >= max(1, a8.shape[1]), f"A not row-major: {a8.stride()}"
        assert b8.stride(0) == 1 and b8.stride(1) >= max(1, b8.shape[0]), f"B not column-major: {b8.stride()}"
        assert a8.shape[1] % 16 == 0 and b8.shape[1] % 16 == 0, f"widths {a8.shape[1]}, {b8.shape[1]}"
        assert not (a8.dtype == E5M2 and b8.dtype == E5M2), "e5m2 x e5m2 has no CUDA kernel"
        assert {a8.dtype, b8.dtype} <= {E4M3, E5M2}
        for s in (scale_a, scale_b):
            assert s.dtype == torch.float32 and s.numel() == 1 and s.device == a8.device
        calls.append((a8.shape, b8.shape))
        return real(a8, scale_a, b8, scale_b, out_dtype)

    monkeypatch.setattr(float8, "_mm", checked)
    return calls


@pytest.mark.parametrize("rows", [48, 7])  # 48: the weight gradient by _scaled_mm too; 7: its fallback
def test_forward_and_backward_of_a_strided_input_keep_the_kernels_layouts(products, rows):
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(32, 64, generator=g) / 8).requires_grad_()
    x = torch.randn(64, rows, generator=g).t().requires_grad_()  # column-major rows x 64: a strided view
    grad = torch.randn(rows, 32, generator=g)
    out = float8_linear(x, weight)
    out.backward(grad)
    assert len(products) == (3 if rows % 16 == 0 else 2)  # forward, input gradient (and weight gradient)
    assert_close_to_ref(out, _dequant(x.detach(), E4M3) @ _dequant(weight.detach(), E4M3).t(), rel=1e-5,
                        what="FP8 product of a strided input")
    assert_close_to_ref(x.grad, _dequant(grad, E5M2) @ _dequant(weight.detach(), E4M3), rel=1e-5,
                        what="input gradient")
    assert_close_to_ref(weight.grad, _dequant(grad, E5M2).t() @ _dequant(x.detach(), E4M3), rel=1e-5,
                        what="weight gradient")


def test_an_sd2_u_net_on_a_batch_of_one_keeps_the_kernels_layouts(products):
    unet = tiny_components("sd2").unet
    assert to_float8(unet) > 0 and any(type(m.proj_in) is Float8Linear for m in unet.modules()
                                       if hasattr(m, "transformer_blocks"))
    g = torch.Generator().manual_seed(6)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 32, generator=g)
    unet(x, torch.tensor([500.0]), context=context).square().mean().backward()
    assert products

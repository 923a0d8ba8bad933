"""FP8 matrix products for the transformer blocks' linear layers (Hopper's e4m3 tensor cores): opt-in, off by default.

`to_float8(network)` makes every eligible `nn.Linear` inside the transformer blocks (attention projections, GEGLU,
the MLP's output, SD-2's token projections) a `Float8Linear`: same parameters, same state_dict keys, the same module
in every other respect; `from_float8` undoes it. Each product scales its operands dynamically, tensor-wise (torchao's
"tensorwise" recipe): `x / s` with `s = amax(|x|) / max(dtype)`, cast to FP8, multiplied by `torch._scaled_mm`
with the scales folded back in, the result in the activations' (or autocast's) dtype. Forward: e4m3 x e4m3.
Backward (training): the output gradient in e5m2 (wider range, 2 mantissa bits) against the e4m3 weight and input
saved from the forward. The weights stay in their own dtype (fp32 master weights in training); only the products
run in FP8. Layers whose widths are not multiples of 16 (what the FP8 kernels need) are left as they are.

Same results within FP8's precision (e4m3 has a 3-bit mantissa: a relative step of 1/16): tests/test_float8.py
compares with the bf16/fp32 products; docs/benchmarks/README.md records speed and the change in outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import LdmError

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_ALIGN = 16  # torch._scaled_mm needs the inner and output widths to be multiples of 16


def quantize(x: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in FP8, row-major, its float32 dequantisation scale): `x ~= x8.float() * scale`, amax mapped to the
    format's max."""
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = amax / torch.finfo(dtype).max
    limit = torch.finfo(dtype).max
    # Elementwise ops keep a strided input's layout (SD-2's proj_in on a batch of one sees a column-major view of
    # the NCHW map), but CUDA's FP8 kernels take only row-major A (and B as the transpose of a row-major matrix).
    return (x.float() / scale).clamp(-limit, limit).to(dtype).contiguous(), scale


def _mm(a8: torch.Tensor, scale_a: torch.Tensor, b8: torch.Tensor, scale_b: torch.Tensor,
        out_dtype: torch.dtype) -> torch.Tensor:
    """`(a8 * scale_a) @ (b8 * scale_b)`: a8 row-major, b8 column-major (what the FP8 kernels take)."""
    return torch._scaled_mm(a8, b8, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def _column_major(x: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major."""
    return x.t().contiguous().t()


class _Float8Product(torch.autograd.Function):
    """`x @ w.T` for a 2-d `x` (rows x in) and `w` (out x in), forward and backward in FP8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, sx = quantize(x, E4M3)
        w8, sw = quantize(weight, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.dtypes = (x.dtype, weight.dtype, out_dtype)
        return _mm(x8, sx, w8.t(), sw, out_dtype)  # w8.t() of a row-major w8 is column-major

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, sx, w8, sw = ctx.saved_tensors
        x_dtype, w_dtype, out_dtype = ctx.dtypes
        g8, sg = quantize(grad.contiguous(), E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # (rows x out) @ (out x in)
            grad_x = _mm(g8, sg, _column_major(w8), sw, out_dtype).to(x_dtype)
        if ctx.needs_input_grad[1]:  # (out x rows) @ (rows x in); the reduction runs over the rows
            if x8.shape[0] % FP8_ALIGN == 0:
                grad_w = _mm(g8.t().contiguous(), sg, _column_major(x8), sx, torch.float32)
            else:  # a row count the kernel cannot reduce over: the same product from the dequantised operands
                grad_w = (g8.float() * sg).t() @ (x8.float() * sx)
            grad_w = grad_w.to(w_dtype)
        return grad_x, grad_w, None


def float8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with the product in FP8; the result in autocast's dtype inside autocast, else in x's."""
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    rows = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        out = _Float8Product.apply(rows, weight, out_dtype)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Float8Linear(nn.Linear):
    """An `nn.Linear` whose product runs in FP8 (its parameters, keys and initialisation are nn.Linear's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float8_linear(x, self.weight, self.bias)


def linear_for(projection: nn.Module):
    """The product a layer's fused weights should use: FP8 when `projection` is a Float8Linear, else F.linear."""
    return float8_linear if isinstance(projection, Float8Linear) else F.linear


def _aligned(linear: nn.Linear) -> bool:
    return linear.in_features % FP8_ALIGN == 0 and linear.out_features % FP8_ALIGN == 0


def transformer_linears(network: nn.Module) -> list[nn.Linear]:
    """The plain nn.Linear layers of every transformer (a module with `transformer_blocks`: its blocks and, in
    SD-2, its token projections) whose widths FP8 can take."""
    found: dict[int, nn.Linear] = {}
    for module in network.modules():
        if hasattr(module, "transformer_blocks"):
            for child in module.modules():
                if type(child) is nn.Linear and _aligned(child):
                    found[id(child)] = child
    return list(found.values())


def to_float8(network: nn.Module) -> int:
    """Make the transformer blocks' linear layers of `network` FP8 in place; returns how many were changed (0 for a
    network already FP8)."""
    if not hasattr(torch, "_scaled_mm"):
        raise LdmError(f"FP8 needs torch._scaled_mm, which torch {torch.__version__} lacks: upgrade torch or drop "
                       "--fp8")
    linears = transformer_linears(network)
    for linear in linears:
        linear.__class__ = Float8Linear  # same parameters and buffers: keys, hooks and devices unchanged
    if not linears and not uses_float8(network):  # already FP8 (a second compile, a reused stage): nothing to do
        raise LdmError(f"{type(network).__name__} has no transformer linear layers whose widths are multiples of "
                       f"{FP8_ALIGN}: FP8 has nothing to run on; drop --fp8")
    return len(linears)


def from_float8(network: nn.Module) -> int:
    """Undo `to_float8`: every Float8Linear becomes a plain nn.Linear again."""
    count = 0
    for module in network.modules():
        if type(module) is Float8Linear:
            module.__class__ = nn.Linear
            count += 1
    return count


def uses_float8(network: nn.Module) -> bool:
    """Whether any product of `network` runs in FP8."""
    return any(type(m) is Float8Linear for m in network.modules())


def check_fp8_device(device: torch.device | str) -> None:
    """FP8 products need a CUDA GPU of compute capability 8.9 or more (Ada, Hopper) or the CPU (slow: for tests)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise LdmError(f"FP8 needs a GPU of compute capability 8.9 or more (Ada, Hopper); {name} is "
                       f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}: drop --fp8")
    if device.type not in ("cuda", "cpu"):
        raise LdmError(f"FP8 runs on CUDA GPUs (and slowly on the CPU), not on {device.type}: drop --fp8")

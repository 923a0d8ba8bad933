"""The Triton GroupNorm(+SiLU) (`ldm.models.group_norm_kernel`, `ldm.models.fused_group_norm`, `--group-norm-kernel`).

Always: the swap keeps every key and value, falls back to the exact reference off the GPU, undoes, and the door
reaches it. With triton's interpreter (`TRITON_INTERPRET=1`, triton installed; CPU tensors): the kernel against a
float64 GroupNorm on small NHWC maps. On a CUDA GPU: the same at SD-1.5's shapes, and compiled with CUDA graphs.
"""
import importlib.util
import json
import os
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import realistic_weights, tiny_configs, unet_inputs
from PIL import Image

from ldm.cli.txt2img import main as txt2img
from ldm.errors import LdmError
from ldm.models import fused_group_norm
from ldm.models.fused_group_norm import (
    FusedGroupNorm,
    SiLUInNorm,
    check_group_norm_kernel,
    use_fused_group_norm,
    uses_fused_group_norm,
)
from ldm.models.unet import UNetModel
from ldm.models.unet_blocks import GroupNorm32, ResBlock
from ldm.pipeline.images import read_png_parameters

HAS_TRITON = importlib.util.find_spec("triton") is not None
interpreted = pytest.mark.skipif(not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
                                 reason="needs triton and TRITON_INTERPRET=1 (its CPU interpreter)")
cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and triton")


def _tiny_unet(**overrides):
    return realistic_weights(UNetModel(tiny_configs(**overrides)[0]), 0).eval()


def _out(unet, memory_format=torch.contiguous_format, dtype=torch.float32):
    x, t, context = unet_inputs()
    with torch.no_grad():
        return unet(x.to(dtype).contiguous(memory_format=memory_format), t, context=context.to(dtype))


def _reference(x, weight, bias, groups, eps, silu, shift=None):
    """GroupNorm (+SiLU) in float64 of x (+ shift, added in x's dtype as `x + shift` rounds it)."""
    if shift is not None:
        x = x + shift[:, :, None, None].to(x.dtype)
    y = F.group_norm(x.double(), groups, weight.double(), bias.double(), eps)
    return F.silu(y) if silu else y


def _kernel(x, weight, bias, groups, eps, silu, shift=None):
    from ldm.models.group_norm_kernel import group_norm_nhwc

    return group_norm_nhwc(x, weight, bias, groups, eps, silu, shift)


def _nhwc(n, c, h, w, dtype, device="cpu", mean=0.0, std=1.0):
    x = torch.randn(n, c, h, w, device=device) * std + mean
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


# ---- always (CPU, no triton needed) ----

def test_the_swap_keeps_every_key_and_value_and_the_reference_output_then_undoes():
    unet = _tiny_unet()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    reference = _out(unet)
    norms = sum(type(m) is GroupNorm32 for m in unet.modules())
    res_blocks = sum(isinstance(m, ResBlock) for m in unet.modules())
    assert use_fused_group_norm(unet) == norms > 0 and uses_fused_group_norm(unet)
    assert list(unet.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    fused = [m for m in unet.modules() if type(m) is FusedGroupNorm and m.fuses_silu]
    assert len(fused) == 2 * res_blocks + 1, "each ResBlock's two norms and the output head's take their SiLU"
    assert sum(type(m) is SiLUInNorm for m in unet.modules()) == len(fused)
    assert sum(type(m) is FusedGroupNorm and not m.fuses_silu for m in unet.modules()) == norms - len(fused)
    # off the GPU every norm takes the reference path: the same numbers, NCHW or NHWC
    assert torch.equal(_out(unet), reference)
    unet.to(memory_format=torch.channels_last)
    nhwc = _out(unet, torch.channels_last)
    assert (nhwc - reference).abs().max() < 1e-4 * reference.abs().max()
    assert use_fused_group_norm(unet, False) == norms
    assert not uses_fused_group_norm(unet) and not any(type(m) is SiLUInNorm for m in unet.modules())
    assert not any(hasattr(m, "__dict__") and "fuses_silu" in m.__dict__ for m in unet.modules())
    assert torch.equal(_out(unet, torch.channels_last), nhwc)


def test_a_scale_shift_resblock_keeps_its_silu_apart_and_its_output():
    block = realistic_weights(ResBlock(64, 32, out_channels=32, use_scale_shift_norm=True), 0).eval()
    x, emb = torch.randn(2, 64, 8, 8), torch.randn(2, 32)
    with torch.no_grad():
        reference = block(x, emb)
        use_fused_group_norm(block)
        assert block.in_layers[0].fuses_silu and type(block.in_layers[1]) is SiLUInNorm
        assert not block.out_layers[0].fuses_silu and type(block.out_layers[1]) is torch.nn.SiLU  # modulated first
        assert torch.equal(block(x, emb), reference)


@torch.library.custom_op("ldm_test::group_norm_stand_in", mutates_args=())
def _stand_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, silu: bool,
              shift: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045  as the kernel op's schema
    """The kernel op's schema with the reference maths: what dynamo sees where the kernel runs."""
    y = F.group_norm(x if shift is None else x + shift[:, :, None, None], num_groups, weight, bias, eps)
    return (F.silu(y) if silu else y).contiguous(memory_format=torch.channels_last)


@_stand_in.register_fake
def _(x, weight, bias, num_groups, eps, silu, shift=None):
    return torch.empty_like(x, memory_format=torch.channels_last)


def test_a_compiled_block_keeps_the_kernel_op_in_one_graph(monkeypatch):
    """Where the kernel runs, dynamo traces the norm's dispatch and the op without a graph break (fullgraph)."""
    block = realistic_weights(ResBlock(64, 32, out_channels=32), 0).eval().to(memory_format=torch.channels_last)
    x, emb = torch.randn(2, 64, 6, 6).contiguous(memory_format=torch.channels_last), torch.randn(2, 32)
    monkeypatch.setattr(fused_group_norm, "_op", torch.ops.ldm_test.group_norm_stand_in)
    monkeypatch.setattr(FusedGroupNorm, "can_use_kernel", lambda self, x: x.ndim == 4 and not torch.is_grad_enabled())
    with torch.no_grad():
        reference = block(x, emb)
        use_fused_group_norm(block)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(block)(x, emb)
        ops = [n for g in explained.graphs for n in g.graph.nodes if "group_norm_stand_in" in str(n.target)]
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        assert len(ops) == 2 and ops[1].args[-1] is not None, "both norms, the second adding the time embedding"
        torch._dynamo.reset()
        compiled = torch.compile(block, backend="eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x, emb), reference, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_the_kernel_needs_triton_on_cuda_only(monkeypatch):
    check_group_norm_kernel("cpu")  # the reference path: nothing to check
    monkeypatch.setattr(fused_group_norm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LdmError, match="drop --group-norm-kernel"):
        check_group_norm_kernel("cuda")


def test_ldm_txt2img_group_norm_kernel_reaches_the_pipeline_and_the_records(tiny_sd_folder, tmp_path):
    common = ["a red circle", "--model", str(tiny_sd_folder), "--steps", "2", "--height", "16", "--width", "16",
              "--seed", "3", "--sampler", "ddim"]
    assert txt2img(common + ["--out", str(tmp_path / "plain")]) == 0
    assert txt2img(common + ["--group-norm-kernel", "--out", str(tmp_path / "gn")]) == 0
    (plain,), (gn,) = ([json.loads(line) for line in (tmp_path / name / "metadata.jsonl").read_text().splitlines()]
                       for name in ("plain", "gn"))
    assert gn["group_norm_kernel"] is True and "group_norm_kernel" not in plain
    assert read_png_parameters(tmp_path / "gn" / gn["file_name"])["group_norm_kernel"] is True
    a, b = (np.asarray(Image.open(tmp_path / name / r["file_name"]), dtype=np.float32)
            for name, r in (("plain", plain), ("gn", gn)))
    assert np.abs(a - b).max() <= 1, "on the CPU the fused norms are the reference (NHWC rounding aside)"


# ---- Triton's interpreter (CPU tensors) ----

SHAPES = [  # n, c, h, w, groups: channels per group not a power of two (SD: 10, 20, 40, 60), odd pixel counts
    (2, 320, 3, 5, 32),
    (1, 96, 7, 7, 32),
    (2, 80, 5, 9, 8),
    (1, 120, 3, 3, 2),
    (2, 40, 1, 1, 4),
]


@interpreted
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("silu", [False, True])
def test_the_interpreted_kernel_is_group_norm_in_float32(shape, silu):
    n, c, h, w, groups = shape
    x = _nhwc(n, c, h, w, torch.float32, mean=0.3)
    weight, bias, shift = 1 + 0.2 * torch.randn(c), 0.2 * torch.randn(c), torch.randn(n, c)
    for s in (None, shift):
        out = _kernel(x, weight, bias, groups, 1e-5, silu, s)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out.double(), _reference(x, weight, bias, groups, 1e-5, silu, s),
                                   atol=2e-5, rtol=2e-5)
        assert torch.equal(_kernel(x, weight, bias, groups, 1e-5, silu, s), out), "deterministic"


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_interpreted_kernel_in_half_precision_rounds_once(dtype):
    n, c, h, w, groups = 2, 320, 5, 3, 32
    x = _nhwc(n, c, h, w, dtype)
    weight, bias = (1 + 0.2 * torch.randn(c)).to(dtype), (0.2 * torch.randn(c)).to(dtype)
    shift = torch.randn(n, c).to(dtype)
    out = _kernel(x, weight, bias, groups, 1e-5, True, shift)
    assert out.dtype == dtype
    reference = _reference(x, weight, bias, groups, 1e-5, True, shift)
    # rounding once: half a unit in the last place on a GPU; the interpreter's float32 -> bf16 casts truncate (numpy
    # has no bf16), in x + shift too: up to 2 units, against 1 for its fp16 (numpy's own, to nearest)
    step = torch.finfo(dtype).eps * (2 if dtype == torch.bfloat16 else 1)
    torch.testing.assert_close(out.double(), reference, atol=step, rtol=step)


@interpreted
def test_the_interpreted_kernel_keeps_its_precision_under_a_large_mean():
    """mean 1000, spread 0.5: sums of squares about zero would cancel in float32 (so does torch's CPU GroupNorm)."""
    n, c, h, w, groups = 2, 80, 6, 7, 8
    x = _nhwc(n, c, h, w, torch.float32, mean=1000.0, std=0.5)
    weight, bias = 1 + 0.2 * torch.randn(c), 0.2 * torch.randn(c)
    out = _kernel(x, weight, bias, groups, 1e-5, False)
    # x itself is stored to float32's step at 1000 (6e-5), i.e. ~1.2e-4 of the 0.5 spread
    torch.testing.assert_close(out.double(), _reference(x, weight, bias, groups, 1e-5, False), atol=2e-3, rtol=0)


@interpreted
def test_the_interpreted_kernel_with_many_tiles_per_block(monkeypatch):
    """Small tiles and few programs: each statistics program loops over several pixel tiles of one channel slice
    (three slices, the last one partial), and the merge steps over the blocks several at a time."""
    from ldm.models import group_norm_kernel

    monkeypatch.setattr(group_norm_kernel, "SUM_CHANNELS", 16)
    monkeypatch.setattr(group_norm_kernel, "SUM_ELEMENTS", 64)
    monkeypatch.setattr(group_norm_kernel, "PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(group_norm_kernel, "MERGE_ELEMENTS", 32)
    n, c, h, w, groups = 2, 40, 11, 13, 4  # 143 pixels in tiles of 4: 36 tiles, 6 per block, 6 blocks
    assert group_norm_kernel.statistics_tiling(n, h * w, c, multiprocessors=40) == (16, 4, 6, 6)
    x = _nhwc(n, c, h, w, torch.float32, mean=-2.0)
    weight, bias = 1 + 0.2 * torch.randn(c), 0.2 * torch.randn(c)
    torch.testing.assert_close(_kernel(x, weight, bias, groups, 1e-6, True).double(),
                               _reference(x, weight, bias, groups, 1e-6, True), atol=2e-5, rtol=2e-5)


def test_the_statistics_tiling_fills_the_device_and_covers_every_pixel():
    """The statistics grid aims at PROGRAMS_PER_SM programs per multiprocessor at the SD shapes, never has an empty
    block, and its blocks x tiles x pixels cover the map exactly once or with one partial tile."""
    pytest.importorskip("triton")
    from ldm.models import group_norm_kernel as gnk

    for n, c, hw in [(2, 320, 4096), (2, 960, 4096), (2, 1280, 256), (2, 2560, 64), (1, 40, 1), (8, 1920, 1024)]:
        block_c, block_p, tiles, blocks = gnk.statistics_tiling(n, hw, c, multiprocessors=132)
        pixel_tiles = -(-hw // block_p)
        assert block_c <= gnk.SUM_CHANNELS and block_c * block_p <= max(gnk.SUM_ELEMENTS, block_c)
        assert (blocks - 1) * tiles < pixel_tiles <= blocks * tiles  # no empty block, every tile in one
        programs = n * blocks * -(-c // block_c)
        assert programs <= gnk.PROGRAMS_PER_SM * 132 + n * -(-c // block_c)  # no more than about one wave's worth
        assert programs >= min(pixel_tiles * n * -(-c // block_c), gnk.PROGRAMS_PER_SM * 132 // 2)


@interpreted
def test_the_fused_u_net_through_the_interpreted_kernel_matches_the_reference(monkeypatch):
    """Every norm through the kernel (as on a GPU), the ResBlocks' time embedding added inside it: the tiny U-Net in
    bf16 NHWC gives the reference's output within bf16's rounding."""
    unet = _tiny_unet().to(torch.bfloat16).to(memory_format=torch.channels_last)
    reference = _out(unet, torch.channels_last, torch.bfloat16).float()
    calls = []
    kernel = fused_group_norm._kernel_op()
    monkeypatch.setattr(FusedGroupNorm, "can_use_kernel", lambda self, x: x.ndim == 4)
    monkeypatch.setattr(fused_group_norm, "_kernel_op", lambda: lambda *args: calls.append(args) or kernel(*args))
    use_fused_group_norm(unet)
    out = _out(unet, torch.channels_last, torch.bfloat16).float()
    norms = sum(type(m) is FusedGroupNorm for m in unet.modules())
    assert len(calls) == norms and sum(args[-1] is not None for args in calls) == \
        sum(isinstance(m, ResBlock) for m in unet.modules()), "every norm ran it, the out_layers' with the embedding"
    assert ((out - reference).norm() / reference.norm()).item() < 2e-2  # bf16's rounding, compounded over the net


# ---- a CUDA GPU ----

SD_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 8, 8), (2, 1920, 16, 16), (2, 960, 32, 32)]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_at_sd_shapes(shape, dtype):
    n, c, h, w = shape
    x = _nhwc(n, c, h, w, dtype, device="cuda", mean=0.5, std=2.0)
    weight, bias = (1 + 0.2 * torch.randn(c, device="cuda")), 0.2 * torch.randn(c, device="cuda")
    shift = torch.randn(n, c, device="cuda").to(dtype)
    step = torch.finfo(dtype).eps
    for silu, s in ((False, None), (True, None), (True, shift)):
        out = _kernel(x, weight, bias, 32, 1e-5, silu, s)
        assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
        torch.testing.assert_close(out.double(), _reference(x, weight, bias, 32, 1e-5, silu, s), atol=step,
                                   rtol=step)
        assert torch.equal(_kernel(x, weight, bias, 32, 1e-5, silu, s), out), "deterministic"


@cuda
@pytest.mark.gpu
def test_cuda_compiled_block_with_the_kernel_in_its_cuda_graph_matches_eager():
    torch._dynamo.reset()
    block = realistic_weights(ResBlock(640, 1280, out_channels=320), 0).eval()
    block = block.to("cuda", torch.bfloat16).to(memory_format=torch.channels_last)
    x = _nhwc(2, 640, 32, 32, torch.bfloat16, device="cuda")
    emb = torch.randn(2, 1280, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        reference = block(x, emb).float()
        use_fused_group_norm(block)
        eager = block(x, emb).float()
        compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True, dynamic=False)  # no graph break
        for _ in range(3):  # record, then replay the CUDA graph
            out = compiled(x, emb).float()
        torch._dynamo.reset()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            compiled_again = torch.compile(block, fullgraph=True, dynamic=False)  # no CUDA graph: kernels visible
            compiled_again(x, emb)
            torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages()]
    assert any("group_norm_apply" in k for k in kernels), f"the kernel ran inside the compiled graph: {kernels}"
    assert ((eager - reference).norm() / reference.norm()).item() < 1e-2
    assert ((out - eager).norm() / eager.norm()).item() < 1e-2


@cuda
@pytest.mark.gpu
def test_cuda_fused_norm_takes_the_kernel_only_where_it_can(monkeypatch):
    norm = GroupNorm32(32, 320).cuda()  # left in training mode: a GroupNorm computes the same, so the kernel too
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    x = _nhwc(2, 320, 16, 16, torch.bfloat16, device="cuda")
    reference = F.silu(GroupNorm32.forward(norm, x))
    sequential = torch.nn.Sequential(norm, torch.nn.SiLU())
    use_fused_group_norm(sequential)
    calls = []
    kernel = fused_group_norm._kernel_op()
    monkeypatch.setattr(fused_group_norm, "_kernel_op", lambda: lambda *args: calls.append(args) or kernel(*args))
    with torch.no_grad():
        out = sequential(x)
        assert len(calls) == 1 and calls[0][5] is True, "bf16 NHWC inference: the kernel, with the SiLU"
        torch.testing.assert_close(out.float(), reference.float(), atol=2e-2, rtol=2e-2)  # bf16: one or two units
        for other in (x.contiguous(), x.float()):  # NCHW, float32: the reference
            torch.testing.assert_close(sequential(other).float(), F.silu(GroupNorm32.forward(norm, other)).float())
    sequential(x)  # grad enabled with parameters that want it: the reference, so autograd works
    assert len(calls) == 1


def test_narrowing_only_swaps_the_first_norms_of_resblocks_that_narrow_their_channels():
    """`narrowing_only=True` (run 10's lever): only the in_layers norms of ResBlocks whose input is wider than their
    output (a decoder's concatenated skips) become FusedGroupNorms, each taking its SiLU; the rest, and every key,
    stay as they were, and off the kernel's path the output is bitwise the reference's."""
    unet = _tiny_unet()
    reference = _out(unet)
    keys = list(unet.state_dict())
    narrowing = [m for m in unet.modules()
                 if isinstance(m, ResBlock) and m.in_layers[0].num_channels > m.out_layers[0].num_channels]
    assert narrowing, "the tiny U-Net's decoder concatenates skips"
    assert use_fused_group_norm(unet, narrowing_only=True) == len(narrowing)
    fused = [m for m in unet.modules() if type(m) is FusedGroupNorm]
    assert {id(m) for m in fused} == {id(block.in_layers[0]) for block in narrowing}
    assert all(m.fuses_silu for m in fused) and all(type(b.in_layers[1]) is SiLUInNorm for b in narrowing)
    assert list(unet.state_dict()) == keys
    assert torch.equal(_out(unet), reference)
    assert use_fused_group_norm(unet, False) == len(narrowing)
    assert not any(type(m) in (FusedGroupNorm, SiLUInNorm) for m in unet.modules())

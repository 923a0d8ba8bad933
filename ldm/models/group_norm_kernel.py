"""A Triton GroupNorm(+SiLU) for NHWC (channels_last) feature maps: forward only, float32 statistics (Wu & He 2018).

Needs triton: import this module only where a kernel will run (`ldm.models.fused_group_norm` imports it lazily).
Why a kernel of our own: in channels_last each pixel holds only C/G contiguous channels of a group (10 channels,
20 bytes in bf16 at C=320), so inductor's decomposition reduces with strided loads. Here every load is a contiguous
run of whole pixels (`p c` rows of the NHWC map), and the groups are formed only from per-channel sums:

1. `_group_norm_channel_sums`, grid (batch, pixel blocks, channel slices): per channel, the sum and sum of squares
   of `x - ref` over the block's pixels, where `ref` is the channel's value at the image's first pixel (a shift that
   keeps the squares from cancelling when the mean is large against the spread); kept per element over the block's
   tiles and reduced once, written to `[n, block, c]` float32 partials. `statistics_tiling` sizes the grid to about
   PROGRAMS_PER_SM programs per multiprocessor (run 10: the first design, one program per pixel block over all
   channels, was latency-bound, 38 us on a 2x320x64x64 map; this one takes 9-13 us on the 64x64 maps).
2. `_group_norm_stats`, grid (batch, group): adds the partials over the blocks in a fixed order, MERGE_ELEMENTS at a
   time (deterministic, no atomics), merges the group's channels (Chan et al. 1979: the channels' squared deviations plus their means'
   spread about the group mean) and writes each channel's group mean and `rstd * weight` to `[n, c]` buffers.
3. `_group_norm_apply`, grid (batch, pixel blocks): `(x - mean) * scale + bias`, then SiLU when asked, stored in x's
   dtype and layout.

`shift` (`n c`, optional) is added to x before everything, rounded to x's dtype as `x + shift` would be: a ResBlock's
`GroupNorm(h + emb)` without writing the sum out first.

`torch.ops.ldm.group_norm_nhwc` is a `torch.library.triton_op`: torch.compile traces through it and inductor keeps
the three kernels in its graph (CUDA graphs capture them); its fake implementation is the same function run on fake
tensors (triton_op registers it), which only allocates.

Measured (docs/benchmarks/README.md, run 10): standalone the 61 norms of the SD-1.5 step take 895 us against
inductor's 1,558, but in the compiled step the kernel loses the adds and concatenations inductor fuses into its own
norms, and the step is 3% slower. Hence opt-in.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

SUM_CHANNELS = 128  # channels per program in the statistics pass (a multiple of 64 at every SD width: no padding)
SUM_ELEMENTS = 4096  # elements of x one statistics program holds per tile (pixels x its channels)
PROGRAMS_PER_SM = 4  # the statistics pass's grid aims at this many programs per multiprocessor
MERGE_ELEMENTS = 2048  # partials the merge holds per step (blocks x channels of a group)
APPLY_ELEMENTS = 4096  # elements of x one apply program holds (pixels x padded channels)


@triton.jit
def _load_pixels(x_ptr, shift_ptr, n, pixels, channels, HW, C, HAS_SHIFT: tl.constexpr):
    """`x[n, pixels, channels]` (+ shift[n, channels], rounded to x's dtype) in float32; 0 outside the map."""
    mask = (pixels < HW)[:, None] & (channels < C)[None, :]
    offsets = (n.to(tl.int64) * HW + pixels[:, None]) * C + channels[None, :]
    v = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_SHIFT:
        s = tl.load(shift_ptr + n * C + channels, mask=channels < C, other=0.0)
        v = (v.to(tl.float32) + s.to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)
    return v.to(tl.float32), mask


@triton.jit
def _group_norm_channel_sums(x_ptr, shift_ptr, sums_ptr, squares_ptr, HW, C, n_blocks, tiles,
                             HAS_SHIFT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    block = tl.program_id(1)
    channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    first, _ = _load_pixels(x_ptr, shift_ptr, n, tl.arange(0, 1), channels, HW, C, HAS_SHIFT)
    # (per element, then one reduction at the end: no cross-thread sum inside the loop)
    total = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    total_sq = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    start = block * BLOCK_P * tiles
    for tile in range(tiles):
        pixels = start + tile * BLOCK_P + tl.arange(0, BLOCK_P)
        v, mask = _load_pixels(x_ptr, shift_ptr, n, pixels, channels, HW, C, HAS_SHIFT)
        d = tl.where(mask, v - first, 0.0)
        total += d
        total_sq += d * d
    out = (n * n_blocks + block) * C + channels
    tl.store(sums_ptr + out, tl.sum(total, axis=0), mask=channels < C)
    tl.store(squares_ptr + out, tl.sum(total_sq, axis=0), mask=channels < C)


@triton.jit
def _group_norm_stats(x_ptr, shift_ptr, sums_ptr, squares_ptr, weight_ptr, mean_ptr, scale_ptr, HW, C, n_blocks,
                      group_size, eps, HAS_SHIFT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr):
    n = tl.program_id(0)
    group = tl.program_id(1)
    j = tl.arange(0, BLOCK_G)
    in_group = j < group_size
    channels = tl.where(in_group, group * group_size + j, C)  # C: out of range, masked by _load_pixels
    total = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)
    total_sq = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)
    for start in range(0, n_blocks, BLOCK_B):  # the blocks in a fixed order: deterministic
        blocks = start + tl.arange(0, BLOCK_B)
        mask = (blocks < n_blocks)[:, None] & in_group[None, :]
        offsets = (n * n_blocks + blocks[:, None]) * C + channels[None, :]
        total += tl.load(sums_ptr + offsets, mask=mask, other=0.0)
        total_sq += tl.load(squares_ptr + offsets, mask=mask, other=0.0)
    total = tl.sum(total, axis=0)  # [BLOCK_G] per channel
    total_sq = tl.sum(total_sq, axis=0)
    first, _ = _load_pixels(x_ptr, shift_ptr, n, tl.arange(0, 1), channels, HW, C, HAS_SHIFT)
    ref = tl.sum(first, axis=0)
    count = HW * 1.0  # (not .to: triton passes an HW of 1 as a constant)
    channel_mean = ref + total / count
    channel_m2 = tl.maximum(total_sq - total * total / count, 0.0)  # sum of squared deviations from its mean
    mean = tl.sum(tl.where(in_group, channel_mean, 0.0), axis=0) / group_size
    spread = tl.where(in_group, channel_mean - mean, 0.0)
    m2 = tl.sum(tl.where(in_group, channel_m2, 0.0), axis=0) + count * tl.sum(spread * spread, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / (count * group_size) + eps)
    weight = tl.load(weight_ptr + channels, mask=in_group, other=0.0).to(tl.float32)
    tl.store(mean_ptr + n * C + channels, tl.zeros([BLOCK_G], dtype=tl.float32) + mean, mask=in_group)
    tl.store(scale_ptr + n * C + channels, weight * rstd, mask=in_group)


@triton.jit
def _group_norm_apply(x_ptr, shift_ptr, mean_ptr, scale_ptr, bias_ptr, out_ptr, HW, C,
               HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    pixels = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.arange(0, BLOCK_C)
    v, mask = _load_pixels(x_ptr, shift_ptr, n, pixels, channels, HW, C, HAS_SHIFT)
    mean = tl.load(mean_ptr + n * C + channels, mask=channels < C, other=0.0)
    scale = tl.load(scale_ptr + n * C + channels, mask=channels < C, other=0.0)
    bias = tl.load(bias_ptr + channels, mask=channels < C, other=0.0).to(tl.float32)
    y = (v - mean[None, :]) * scale[None, :] + bias[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    offsets = (n.to(tl.int64) * HW + pixels[:, None]) * C + channels[None, :]
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


_SMS: dict = {}


def _multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count (cached; 4 off CUDA, where only the interpreter runs the kernels)."""
    if device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def statistics_tiling(n: int, hw: int, channels: int, multiprocessors: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_P, tiles per block, pixel blocks per image) of the statistics pass: channel slices of
    SUM_CHANNELS, pixel tiles of SUM_ELEMENTS / SUM_CHANNELS, and as many pixel blocks as bring the grid near
    PROGRAMS_PER_SM programs per multiprocessor (more only lengthens the merge). A function of the shape and the
    device alone, so the sums' order, and so the result, is the same on every call."""
    block_c = min(SUM_CHANNELS, triton.next_power_of_2(channels))
    block_p = max(1, min(triton.next_power_of_2(hw), SUM_ELEMENTS // block_c))
    pixel_tiles = triton.cdiv(hw, block_p)
    wanted = max(1, triton.cdiv(PROGRAMS_PER_SM * multiprocessors, n * triton.cdiv(channels, block_c)))
    tiles = triton.cdiv(pixel_tiles, min(wanted, pixel_tiles))
    return block_c, block_p, tiles, triton.cdiv(pixel_tiles, tiles)


def apply_tiling(hw: int, channels: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of the apply pass: whole pixels (channels padded to a power of two)."""
    block_c = triton.next_power_of_2(channels)
    return block_c, max(1, min(triton.next_power_of_2(hw), APPLY_ELEMENTS // block_c))


@triton_op("ldm::group_norm_nhwc", mutates_args=())
def group_norm_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
                    silu: bool, shift: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045 (schema)
    """GroupNorm of `b c h w` x (stored channels_last) over `num_groups` groups, then SiLU when `silu`; `shift`
    (`b c`) is added to x first. Statistics in float32; the result in x's dtype, channels_last."""
    n, c, h, w = x.shape
    x = x.contiguous(memory_format=torch.channels_last)  # a no-op for the NHWC maps it is meant for
    has_shift = shift is not None
    shift = shift.reshape(n, c).contiguous() if has_shift else x  # x: an unused pointer
    hw = h * w
    sum_c, sum_p, tiles, n_blocks = statistics_tiling(n, hw, c, _multiprocessors(x.device))
    sums = torch.empty((n, n_blocks, c), device=x.device, dtype=torch.float32)
    squares = torch.empty_like(sums)
    wrap_triton(_group_norm_channel_sums)[(n, n_blocks, triton.cdiv(c, sum_c))](
        x, shift, sums, squares, hw, c, n_blocks, tiles, HAS_SHIFT=has_shift, BLOCK_P=sum_p, BLOCK_C=sum_c,
        num_warps=8 if sum_c * sum_p >= 4096 else 4)
    mean = torch.empty((n, c), device=x.device, dtype=torch.float32)
    scale = torch.empty_like(mean)
    block_g = triton.next_power_of_2(c // num_groups)
    wrap_triton(_group_norm_stats)[(n, num_groups)](
        x, shift, sums, squares, weight, mean, scale, hw, c, n_blocks, c // num_groups, eps, HAS_SHIFT=has_shift,
        BLOCK_B=min(triton.next_power_of_2(n_blocks), max(1, MERGE_ELEMENTS // block_g)), BLOCK_G=block_g,
        num_warps=4)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    block_c, block_p = apply_tiling(hw, c)
    wrap_triton(_group_norm_apply)[(n, triton.cdiv(hw, block_p))](
        x, shift, mean, scale, bias, out, hw, c, HAS_SHIFT=has_shift, SILU=silu, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=8 if block_c * block_p >= 4096 else 4)
    return out

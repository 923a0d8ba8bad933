"""FLOPs counted by torch.utils.flop_counter, the device's measured peak, and model FLOP utilisation (MFU)."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ldm.bench.timing import median_ms


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# PyTorch counts its CUDA attention kernels (flash, memory-efficient, cuDNN) but not the CPU's flash kernel.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (matrix products, convolutions and attention, forward and backward), as run."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m, k) @ (k, n) product: one multiply and one add per term."""
    return 2 * m * n * k


def measure_peak(device: torch.device | str = "cuda", size: int = 8192, dtype: torch.dtype = torch.bfloat16,
                 repeats: int = 20) -> float:
    """FLOP/s of a large square matrix product on `device` (random, not zero, data: zeros draw less power)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, warmup=3, repeats=repeats)
    return matmul_flops(size, size, size) / (ms / 1000)


def mfu(flops_per_call: float, seconds_per_call: float, peak_flops: float) -> float:
    """Model FLOP utilisation: counted FLOPs per second over the measured peak, in [0, 1] for a sane peak."""
    if seconds_per_call <= 0 or peak_flops <= 0:
        raise ValueError(f"time ({seconds_per_call}) and peak ({peak_flops}) must be positive")
    return flops_per_call / seconds_per_call / peak_flops


def mfu_from_throughput(flops_per_item: float, items_per_second: float, peak_flops: float) -> float:
    """MFU of a throughput benchmark (images/s) whose one item costs `flops_per_item`."""
    return mfu(flops_per_item, 1.0 / items_per_second, peak_flops)

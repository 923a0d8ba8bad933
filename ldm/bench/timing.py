"""Timing: medians of CUDA-event timings after warm-up (host clock on the CPU), ours and a peer in alternation."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_times_ms(fn: Callable[[], object], device: torch.device | str, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls: CUDA events on a GPU, the host clock after a sync elsewhere."""
    device = torch.device(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return times


def median_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(call_times_ms(fn, device, repeats))


def alternate(sides: dict[str, Callable[[], object]], device: torch.device | str, *, warmup: int = 3,
              rounds: int = 5, repeats: int = 4) -> dict[str, float]:
    """Median milliseconds per side, the sides timed in turn (`rounds` x `repeats` calls each) after each warms up.

    Alternating puts ours and the peer under the same clocks and temperature, so drift over the run is shared.
    """
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name] += call_times_ms(fn, device, repeats)
    return {name: statistics.median(t) for name, t in times.items()}

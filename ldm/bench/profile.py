"""Where a step's GPU time goes: torch.profiler's device kernels summed by kind (convolution, matrix product,
attention, normalisation, fused elementwise, copies), per call of the step."""
from __future__ import annotations

from typing import Callable

import torch

KINDS = (  # (kind, substrings of a kernel's name that mark it; the first match wins, lower case)
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("convolution", ("conv", "implicit_gemm", "xmma_fprop", "dgrad", "wgrad", "cudnn", "winograd", "fprop")),
    ("matrix product", ("gemm", "cutlass", "nvjet", "cublas", "matmul", "_mm_", "scaled_mm", "sm90_xmma")),
    ("normalisation", ("group_norm", "layer_norm", "groupnorm", "layernorm", "welford", "rowwise_moments")),
    ("fused (triton)", ("triton",)),
    ("copy / layout", ("copy", "transpose", "memcpy", "memset", "cat", "nchw", "nhwc", "convert")),
)


NORM_MARKERS = dict(KINDS)["normalisation"]


def kind_of(kernel: str) -> str:
    """The kind of a GPU kernel, from its name (`other` when no marker matches). Inductor's own kernels are named
    for the operations they fuse (`triton_poi_fused_convolution_0` is the elementwise work after a convolution), so
    a Triton kernel is a normalisation or fused elementwise work, never a convolution or product; except inductor's
    templates (`triton_tem_fused_convolution_add_5`, `triton_tem_fused_addmm_gelu_3`: max-autotune's winners), which
    are the convolution or product itself with its epilogue fused in."""
    name = kernel.lower()
    if name.startswith("triton_tem_"):
        if "attention" in name:
            return "attention"
        return "convolution" if "conv" in name else "matrix product"
    if name.startswith("triton_"):
        return "normalisation" if any(m in name for m in NORM_MARKERS) else "fused (triton)"
    for kind, markers in KINDS:
        if any(m in name for m in markers):
            return kind
    return "other"


def kernel_breakdown(fn: Callable[[], object], *, calls: int = 5, top: int = 12) -> dict:
    """Profile `calls` calls of `fn` (after one warm-up) on the GPU: milliseconds per call by kind, the kernel
    count per call, and the `top` kernels by time."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415  only a profiling run needs it

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = {}
    kernels: list[tuple[str, float, int]] = []
    for event in prof.key_averages():
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        if us <= 0:
            continue
        kernels.append((event.key, us / 1000 / calls, event.count // calls))
        kind = kind_of(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + us / 1000 / calls
    kernels.sort(key=lambda k: -k[1])
    return {"ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "gpu_ms": round(sum(by_kind.values()), 3),
            "kernels_per_call": sum(k[2] for k in kernels),
            "top": [{"kernel": name[:120], "ms": round(ms, 3), "count": n} for name, ms, n in kernels[:top]]}

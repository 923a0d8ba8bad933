"""Scaled dot-product attention over `b h n d` with a switchable backend: "sdpa" (default), "xformers", "math"."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "xformers", "math")
SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                "math": "MATH"}  # names for set_sdpa_kernels -> torch.nn.attention.SDPBackend members

_backend = "sdpa"
_xformers_ok: bool | None = None  # result of the one-time probe; None = not probed yet
_warned_fallback = False
_sdpa_kernels: list | None = None  # SDPBackend members PyTorch may pick from, in order; None = its own choice


def _probe_xformers() -> bool:
    """True when xformers is importable and its memory-efficient kernel runs on a tiny CUDA tensor."""
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 8, 1, 32, device="cuda", dtype=torch.float16)  # b n h d
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001  ImportError, or "xFormers wasn't build with CUDA support" (PyPI's wheel)
        return False


def xformers_available() -> bool:
    """Whether a working CUDA build of xformers is installed (probed once, then cached)."""
    global _xformers_ok
    if _xformers_ok is None:
        _xformers_ok = _probe_xformers()
    return _xformers_ok


def _warn_fallback(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"attention backend 'xformers': {reason}; using PyTorch SDPA instead", stacklevel=3)


def set_attention_backend(name: str) -> None:
    """Select the backend used by `attention()` for the whole process."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(BACKENDS)}")
    if name == "xformers" and not xformers_available():
        _warn_fallback("no working CUDA build of xformers is installed (PyPI's wheel has no CUDA kernels)")
    _backend = name


def get_attention_backend() -> str:
    """The name of the backend selected now."""
    return _backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use backend `name` inside a `with` block, then restore the previous one."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def set_sdpa_kernels(names: list[str] | None) -> None:
    """Prefer these PyTorch SDPA kernels, in order (e.g. ["cudnn"]); the others stay as fallbacks (a masked
    cross-attention flash cannot run); None: PyTorch's own order."""
    global _sdpa_kernels
    if names is None:
        _sdpa_kernels = None
        return
    unknown = [n for n in names if n not in SDPA_KERNELS]
    if unknown or not names:
        raise ValueError(f"unknown SDPA kernels {unknown or names}; choose from {list(SDPA_KERNELS)}")
    order = list(dict.fromkeys([*names, *SDPA_KERNELS]))
    _sdpa_kernels = [getattr(SDPBackend, SDPA_KERNELS[n]) for n in order]


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(d)) v computed in float32 (eq. 1 of Vaswani et al. 2017)."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhid,bhjd->bhij", q.float() * scale, k.float())
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", scores.softmax(dim=-1), v.float()).to(q.dtype)


def _attention_xformers(q, k, v, mask):
    import xformers.ops as xops

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # b h n d -> b n h d
    bias = None
    if mask is not None:
        b, n_q, h, _ = q.shape
        n_k = k.shape[1]
        # xformers wants a materialised bias whose last dim sits on an 8-element aligned stride
        bias = q.new_zeros(b, h, n_q, n_k + (-n_k) % 8)[..., :n_k]
        bias.masked_fill_(~mask[:, None, None, :], float("-inf"))
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over `b h n d` tensors; `mask` is a bool `b n_k` key mask (True = attend) or None."""
    if _backend == "math":
        return attention_math(q, k, v, mask)
    if _backend == "xformers":
        if xformers_available() and q.is_cuda:
            return _attention_xformers(q, k, v, mask)
        _warn_fallback("inputs are not on a CUDA device" if xformers_available() else "xformers is unavailable")
    attn_mask = None if mask is None else mask[:, None, None, :]  # b n_k -> b 1 1 n_k, broadcast over heads/queries
    if _sdpa_kernels is not None and q.is_cuda:
        with sdpa_kernel(_sdpa_kernels, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

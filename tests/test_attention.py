import sys
import types
import warnings

import pytest
import torch
from helpers import assert_close_to_ref

import ldm.models.attention as A


@pytest.fixture(autouse=True)
def _fresh_backend_state(monkeypatch):
    """Each test starts from the default backend, an un-probed xformers and no warning issued yet."""
    monkeypatch.setattr(A, "_backend", "sdpa")
    monkeypatch.setattr(A, "_xformers_ok", None)
    monkeypatch.setattr(A, "_warned_fallback", False)


def _qkv(n_q=7, n_k=11, b=2, h=3, d=16, dtype=torch.float32):
    q = torch.randn(b, h, n_q, d, dtype=dtype)
    return q, torch.randn(b, h, n_k, d, dtype=dtype), torch.randn(b, h, n_k, d, dtype=dtype)


def _mask(b=2, n_k=11):
    mask = torch.ones(b, n_k, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, :2] = False
    return mask


def test_math_matches_explicit_formula():
    q, k, v = _qkv()
    w = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # d = 16 -> sqrt(d) = 4
    assert_close_to_ref(A.attention_math(q, k, v), w @ v)


@pytest.mark.parametrize("use_mask", [False, True])
def test_sdpa_matches_math(use_mask):
    q, k, v = _qkv()
    mask = _mask() if use_mask else None
    with A.attention_backend("sdpa"):
        a = A.attention(q, k, v, mask)
    with A.attention_backend("math"):
        b = A.attention(q, k, v, mask)
    assert_close_to_ref(a, b)
    assert a.shape == (2, 3, 7, 16)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_mask_equals_dropping_the_keys(backend):
    q, k, v = _qkv()
    mask = _mask()
    with A.attention_backend(backend):
        full = A.attention(q, k, v, mask)
        first = A.attention(q[:1], k[:1, :, :6], v[:1, :, :6])
        second = A.attention(q[1:], k[1:, :, 2:], v[1:, :, 2:])
    assert_close_to_ref(full, torch.cat([first, second]))
    # and the mask really changes the result
    assert (full - A.attention(q, k, v)).abs().max().item() > 1e-2


def test_math_runs_in_float32_for_half_inputs():
    q, k, v = (t.bfloat16() for t in _qkv())
    out = A.attention_math(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = A.attention_math(q.float(), k.float(), v.float())
    # float32 internally: only the final rounding to bf16 remains (half an ulp: relative error <= 2^-8)
    assert ((out.float() - ref).abs() <= ref.abs() * 2**-8).all()


def test_backend_selection_and_errors():
    assert A.get_attention_backend() == "sdpa"
    with A.attention_backend("math"):
        assert A.get_attention_backend() == "math"
    assert A.get_attention_backend() == "sdpa"
    with pytest.raises(ValueError, match=r"'sdpa', 'xformers', 'math'"):
        A.set_attention_backend("flash")
    with pytest.raises(ValueError), A.attention_backend("nope"):
        pass
    assert A.get_attention_backend() == "sdpa"


def test_xformers_without_cuda_build_falls_back_to_sdpa():
    # here xformers is not installed (or, on a GPU box, maybe PyPI's CUDA-less wheel) and there is no GPU
    if torch.cuda.is_available():
        pytest.skip("the real probe may succeed on a GPU machine")
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match="xformers"):
        A.set_attention_backend("xformers")
    assert A.get_attention_backend() == "xformers"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only: calls stay silent
        out = A.attention(q, k, v, _mask())
    with A.attention_backend("sdpa"):
        torch.testing.assert_close(out, A.attention(q, k, v, _mask()), atol=0, rtol=0)


def test_probe_failure_warns_once_and_probes_once(monkeypatch):
    calls = []
    monkeypatch.setattr(A, "_probe_xformers", lambda: calls.append(1) or False)  # "xFormers wasn't built with CUDA"
    with pytest.warns(UserWarning, match="no working CUDA build"):
        A.set_attention_backend("xformers")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.set_attention_backend("xformers")
        q, k, v = _qkv()
        out = A.attention(q, k, v)
    assert calls == [1]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=0, rtol=0)


def test_working_xformers_but_cpu_inputs_use_sdpa(monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("xformers must not be called on CPU tensors")

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=broken)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    monkeypatch.setattr(A, "_probe_xformers", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.set_attention_backend("xformers")  # a working build: no warning at selection
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match="not on a CUDA device"):
        out = A.attention(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("use_mask", [False, True])
def test_xformers_matches_sdpa_on_gpu(use_mask):
    if not A.xformers_available():
        pytest.skip("no working CUDA build of xformers")
    q, k, v = (t.cuda().half() for t in _qkv(n_k=77, d=64))
    mask = _mask(n_k=77).cuda() if use_mask else None
    with A.attention_backend("xformers"):
        a = A.attention(q, k, v, mask)
    with A.attention_backend("sdpa"):
        b = A.attention(q, k, v, mask)
    assert_close_to_ref(a, b, rel=1e-3)  # float16

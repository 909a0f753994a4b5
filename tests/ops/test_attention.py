"""Public flash-attn compatible API: CPU path, validation, and (marked gpu) the Triton kernels vs reference."""
import math

import pytest
import torch

import pagoda
from pagoda.reference import attention as ref
from tests.helpers import assert_finite_lse_close, rel_err

# --------------------------------------------------------------------------------------------- CPU path


def test_cpu_path_matches_reference_dense():
    q, k, v = torch.randn(2, 13, 8, 64), torch.randn(2, 20, 2, 64), torch.randn(2, 20, 2, 64)
    out, lse, probs = pagoda.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    r, rl, _ = ref.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, compute_dtype=torch.float64)
    assert out.shape == q.shape and lse.shape == (2, 8, 13) and lse.dtype == torch.float32 and probs is None
    assert rel_err(out, r) < 1e-5
    assert_finite_lse_close(lse, rl, atol=1e-4)


def test_cpu_path_bf16_and_default_return():
    q = torch.randn(1, 5, 2, 32, dtype=torch.bfloat16)
    out = pagoda.flash_attn_func(q, q, q)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.shape == q.shape


def test_cpu_path_varlen():
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    q, k, v = torch.randn(10, 4, 16), torch.randn(10, 4, 16), torch.randn(10, 4, 16)
    out, lse, _ = pagoda.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, return_attn_probs=True)
    assert out.shape == (10, 4, 16) and lse.shape == (4, 10)
    dense = pagoda.flash_attn_func(q[3:10][None], k[3:10][None], v[3:10][None], causal=True)[0]
    assert rel_err(out[3:10], dense) < 1e-6


# ------------------------------------------------------------------------------------------- validation

def _qkv(b=1, s=4, h=2, d=16, dtype=torch.float16):
    return (torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, h, d, dtype=dtype),
            torch.randn(b, s, h, d, dtype=dtype))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(dropout_p=0.1), NotImplementedError, "dropout_p"),
    (dict(dropout_p=-1.0), ValueError, "dropout_p"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(window_size=(4,)), ValueError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(softmax_scale=-0.1), ValueError, "softmax_scale"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.float64)), TypeError, "alibi_slopes"),
    (dict(causal=1), TypeError, "causal"),
])
def test_bad_options_raise_naming_the_argument(kwargs, err, match):
    with pytest.raises(err, match=match):
        pagoda.flash_attn_func(*_qkv(), **kwargs)


def test_bad_tensors_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must have 4"):
        pagoda.flash_attn_func(q[0], k, v)
    with pytest.raises(TypeError, match="same dtype"):
        pagoda.flash_attn_func(q, k.float(), v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        pagoda.flash_attn_func(q.numpy(), k, v)
    with pytest.raises(ValueError, match="head_dim"):
        pagoda.flash_attn_func(*_qkv(d=12))
    with pytest.raises(ValueError, match="head_dim"):
        pagoda.flash_attn_func(*_qkv(d=264))
    with pytest.raises(ValueError, match="multiple of nheads"):
        pagoda.flash_attn_func(torch.randn(1, 4, 3, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16))
    with pytest.raises(ValueError, match="batch"):
        pagoda.flash_attn_func(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(TypeError, match="dtype"):
        pagoda.flash_attn_func(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))


def test_bad_cu_seqlens_raise():
    q = torch.randn(10, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = [
        (torch.tensor([0, 6, 4], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), r"\[0\] must be 0"),
        (torch.tensor([0, 4, 11], dtype=torch.int32), "exceeds"),
        (torch.tensor([0, 4, 10], dtype=torch.int64), "int32"),
        (torch.tensor([[0, 4, 10]], dtype=torch.int32), "dimensions"),
    ]
    for cu, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            pagoda.flash_attn_varlen_func(q, q, q, cu, good, 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k must have length"):
        pagoda.flash_attn_varlen_func(q, q, q, good, torch.tensor([0, 10], dtype=torch.int32), 6, 10)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        pagoda.flash_attn_varlen_func(q, q, q, good, good, 5, 6)
    with pytest.raises(TypeError, match="max_seqlen_k"):
        pagoda.flash_attn_varlen_func(q, q, q, good, good, 6, 6.0)


# --------------------------------------------------------------------------------------------- GPU path

gpu = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


@pytest.fixture(params=["default", "triton"])
def dense_kernel(request, monkeypatch):
    """Dense cases run twice on the GPU: the default dispatch (on sm_90, d 64/128 causal/full go to the Gluon
    kernel) and with PAGODA_HOPPER_ATTN=0, so the Triton kernel those calls fall back to stays covered."""
    if request.param == "triton":
        monkeypatch.setenv("PAGODA_HOPPER_ATTN", "0")
    return request.param


def _gpu_case(b, sq, sk, hq, hk, d, dtype, **kw):
    dev = "cuda"
    q = torch.randn(b, sq, hq, d, device=dev, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=dev, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=dev, dtype=dtype)
    out, lse, _ = pagoda.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    r, rl, _ = ref.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert not out.isnan().any() and out.dtype == dtype
    err = rel_err(out, r)
    assert err < TOL[dtype], f"relative error {err:.2e}"
    assert_finite_lse_close(lse, rl, atol=2e-2)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("s", [1, 7, 17, 97, 1000])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_head_dims_and_odd_lengths(dtype, d, s, causal, dense_kernel):
    _gpu_case(2, s, s, 4, 4, d, dtype, causal=causal)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("sq,sk", [(97, 1000), (1000, 97), (1, 1000)])
@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(64, 16)),
                                  dict(causal=True, window_size=(100, 0)), dict(softcap=30.0),
                                  dict(causal=True, alibi=True)])
def test_gpu_gqa_masks_and_options(dtype, group, sq, sk, opts, dense_kernel):
    opts = dict(opts)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(2, 8, device="cuda") * 0.1
    _gpu_case(2, sq, sk, 8, 8 // group, 128, dtype, **opts)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_varlen_with_empty_and_single(dtype, d, causal):
    lens_q = [0, 1, 17, 1000, 1, 97, 0, 300]
    lens_k = [5, 1, 17, 1000, 64, 97, 0, 700]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q), 8, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), 2, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), 2, d, device="cuda", dtype=dtype)
    out, lse, _ = pagoda.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                return_attn_probs=True)
    r, rl, _ = ref.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                          return_attn_probs=True)
    assert rel_err(out, r) < TOL[dtype]
    assert_finite_lse_close(lse, rl, atol=2e-2)


@gpu
def test_gpu_autotuned_path_matches_reference(monkeypatch):
    monkeypatch.setenv("PAGODA_AUTOTUNE", "1")
    for causal in (False, True):
        _gpu_case(2, 1024, 1024, 16, 16, 128, torch.bfloat16, causal=causal)


@gpu
def test_gpu_no_quadratic_memory():
    # 16k tokens, 16 heads: a materialised score matrix alone would take 16 * 16k * 16k * 2 B = 8 GiB.
    q = torch.randn(1, 16384, 16, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, lse, _ = pagoda.flash_attn_func(q, q, q, causal=True, return_attn_probs=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= out.numel() * 2 + lse.numel() * 4 + (1 << 20)
    assert math.isfinite(lse.float().mean().item())


@pytest.mark.gpu
def test_gpu_varlen_repeat_calls_do_not_sync():
    """The first call reads cu_seqlens on the host (validation: a sync); the layers after it, on the same
    tensors, do not."""
    lens = [300, 1, 77]
    cu = torch.tensor([0, 300, 301, 378], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens), 8, 128, dtype=torch.bfloat16, device="cuda")
    k, v = torch.randn_like(q[:, :2]), torch.randn_like(q[:, :2])
    want = pagoda.flash_attn_varlen_func(q, k, v, cu, cu, 300, 300, causal=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [pagoda.flash_attn_varlen_func(q, k, v, cu, cu, 300, 300, causal=True) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(g, want) for g in got)

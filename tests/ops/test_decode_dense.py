"""`pagoda.ops.decode_dense`: decode over HF-style contiguous caches (strided views), kernel path in the
interpreter (PAGODA_TRITON_ON_CPU=1) and the CPU reference path, against the float64 reference."""
import os

import pytest
import torch

from pagoda.ops import _decode_plan
from pagoda.ops import decode_dense as dd
from pagoda.reference import attention as ref
from tests.helpers import fake_fast_launch, rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _hf_cache(b, hk, s, d, dtype, static_len=None, seed=0):
    """k, v as HF hands them transposed: [b, s, hk, d] views of [b, hk, S, d] (S > s for a static cache)."""
    g = torch.Generator().manual_seed(seed)
    full = static_len or s
    k = torch.randn(b, hk, full, d, generator=g).to(dtype)
    v = torch.randn(b, hk, full, d, generator=g).to(dtype)
    return k[:, :, :s].transpose(1, 2), v[:, :, :s].transpose(1, 2)


def _want(q, k, v, scale):
    return ref.flash_attn_func(q[:, None].double(), k.double(), v.double(), softmax_scale=scale,
                               compute_dtype=torch.float64)[:, 0]


@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("static_len", [None, 64])
def test_cpu_reference_path(hq, hk, static_len):
    q = torch.randn(3, hq, 32)
    k, v = _hf_cache(3, hk, 37, 32, torch.float32, static_len)
    assert rel_err(dd.decode_dense(q, k, v, 0.3), _want(q, k, v, 0.3)) < 1e-5


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (no CUDA)")
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2)])
@pytest.mark.parametrize("static_len", [None, 64])
@pytest.mark.parametrize("sms", [1, 64])          # 64 SMs: a lone request is split across programs
def test_kernel_path_matches_reference(monkeypatch, hq, hk, static_len, sms):
    monkeypatch.setenv("PAGODA_TRITON_ON_CPU", "1")
    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: sms)
    monkeypatch.setattr(dd, "_meta_cache", {})
    b, s, d = 2, 600 if sms > 1 else 37, 32
    q = torch.randn(b, hq, d).half()
    k, v = _hf_cache(b, hk, s, d, torch.float16, None if sms > 1 else static_len)
    out = dd.decode_dense(q, k, v, d ** -0.5)
    if sms > 1:
        assert dd._meta_cache[next(iter(dd._meta_cache))][4] > 1, "the split path was not taken"
    assert out.dtype == torch.float16 and out.shape == q.shape
    assert rel_err(out.float(), _want(q, k, v, d ** -0.5)) < 2e-3
    again = dd.decode_dense(q, k, v, d ** -0.5)          # metadata reused: same result
    assert torch.equal(again, out)


def test_empty_cache_gives_zeros():
    q = torch.randn(2, 4, 16)
    k = torch.randn(2, 0, 2, 16)
    assert torch.equal(dd.decode_dense(q, k, k, 1.0), torch.zeros_like(q))


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (no CUDA)")
def test_hf_decode_step_runs_the_decode_kernel(monkeypatch):
    """HF's decode call (q_len 1, no mask / static-cache mask) goes through `decode_dense` and matches SDPA."""
    import types

    from pagoda.integrations import transformers as pt

    monkeypatch.setenv("PAGODA_TRITON_ON_CPU", "1")
    monkeypatch.setattr(dd, "_meta_cache", {})
    calls = []
    real = pt.decode_dense
    monkeypatch.setattr(pt, "decode_dense", lambda *a: calls.append(1) or real(*a))
    b, hq, hk, d, filled, cap = 2, 8, 2, 32, 21, 48
    q = torch.randn(b, hq, 1, d).half()
    k_all, v_all = torch.randn(b, hk, cap, d).half(), torch.randn(b, hk, cap, d).half()
    module = types.SimpleNamespace(is_causal=True, training=False)
    mask = torch.zeros(b, 1, 1, cap, dtype=torch.bool)
    mask[..., :filled] = True                                   # static cache: the filled slots
    for k, v, m in ((k_all[:, :, :filled], v_all[:, :, :filled], None), (k_all, v_all, mask)):
        out, _ = pt.pagoda_attention_forward(module, q, k, v, m, scaling=d ** -0.5)
        want = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k_all[:, :, :filled].float(), v_all[:, :, :filled].float(), enable_gqa=True)
        assert rel_err(out.float(), want.transpose(1, 2)) < 2e-3
    assert len(calls) == 2


def test_repeat_calls_replay_the_recorded_launch_with_the_new_tensors(monkeypatch):
    """A second call with the same shapes, strides, alignment and scale re-launches the recorded kernel with
    only q, k, v and out swapped; any change of those re-plans through `decode_fwd`."""
    from pagoda.kernels import _launch
    from pagoda.kernels import decode as kdecode

    log = []
    kernel = fake_fast_launch(monkeypatch, log, ["Q", "K", "V", "O", "L", "n", "scale"])

    fwd_calls = []

    def fake_decode_fwd(q, k, v, ks, vs, indptr, indices, last, s, hk, out, lse, **kw):
        fwd_calls.append(s)
        _launch.launch(kernel, (q.shape[0], hk), q, k, v, out, lse, s, kw["sm_scale"])

    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: 1)
    monkeypatch.setattr(dd, "_meta_cache", {})
    monkeypatch.setattr(dd, "_bound", {})
    monkeypatch.setattr(kdecode, "decode_fwd", fake_decode_fwd)
    q1, q2 = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    k1, v1 = _hf_cache(2, 2, 40, 16, torch.float32, seed=1)
    k2, v2 = _hf_cache(2, 2, 40, 16, torch.float32, seed=2)
    dd.decode_dense(q1, k1, v1, 0.25)
    out2 = dd.decode_dense(q2, k2, v2, 0.25)
    assert [e[0] for e in log] == ["planned", "replay"] and fwd_calls == [40], "the 2nd call must be a replay"
    replayed = log[1][1]
    assert replayed[0] is q2 and replayed[1] is k2 and replayed[2] is v2 and replayed[3] is out2
    assert replayed[4] is log[0][1][4] and replayed[5] == 40         # LSE scratch and scalars kept
    kept = next(iter(dd._bound.values()))[0][0][2]
    assert kept[:4] == [None] * 4, "the first call's q/k/v/out must not be held between calls"
    dd.decode_dense(q2, k2, v2, 0.5)                                   # another scale: planned again
    k3, v3 = _hf_cache(2, 2, 41, 16, torch.float32)                    # another length: planned again
    dd.decode_dense(q2, k3, v3, 0.25)
    assert [e[0] for e in log] == ["planned", "replay", "planned", "planned"] and fwd_calls == [40, 40, 41]

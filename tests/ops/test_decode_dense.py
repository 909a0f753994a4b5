"""`pagoda.ops.decode_dense`: decode over HF-style contiguous caches (strided views), kernel path in the
interpreter (`pagoda._switches.TRITON_ON_CPU`) and the CPU reference path, against the float64 reference."""
import os

import pytest
import torch

from pagoda import _switches
from pagoda.ops import _decode_plan
from pagoda.ops import decode_dense as dd
from pagoda.reference import attention as ref
from tests.helpers import fake_fast_launch, rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    """Every test starts without cached metadata or bound launches."""
    for name in ("_static_cache", "_len_cache", "_chunk_cache", "_ws_cache", "_bound", "_hf"):
        monkeypatch.setattr(dd, name, {})


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
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: sms)
    b, s, d = 2, 600 if sms > 1 else 37, 32
    q = torch.randn(b, hq, d).half()
    k, v = _hf_cache(b, hk, s, d, torch.float16, None if sms > 1 else static_len)
    out = dd.decode_dense(q, k, v, d ** -0.5)
    if sms > 1:
        assert next(iter(dd._ws_cache))[1] > 1, "the split path was not taken"
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
    from pagoda.kernels.attention import decode as kdecode

    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    calls = []
    real = kdecode.decode_fwd
    monkeypatch.setattr(kdecode, "decode_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
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
    from pagoda.kernels.attention import decode as kdecode
    from pagoda.kernels.launch import fast as _launch

    log = []
    kernel = fake_fast_launch(monkeypatch, log, ["Q", "K", "V", "O", "L", "n", "scale"])

    fwd_calls = []

    def fake_decode_fwd(q, k, v, ks, vs, indptr, indices, last, s, hk, out, lse, **kw):
        fwd_calls.append(s)
        _launch.launch(kernel, (q.shape[0], hk), q, k, v, out, lse, s, kw["sm_scale"])

    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: 1)
    monkeypatch.setattr(kdecode, "decode_fwd", fake_decode_fwd)
    q1, q2 = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    k1, v1 = _hf_cache(2, 2, 40, 16, torch.float32, seed=1)
    k2, v2 = _hf_cache(2, 2, 40, 16, torch.float32, seed=2)
    dd.decode_dense(q1, k1, v1, 0.25)
    out2 = dd.decode_dense(q2, k2, v2, 0.25)
    # One page per row: 40 keys rounded up to a page of 64.
    assert [e[0] for e in log] == ["planned", "replay"] and fwd_calls == [64], "the 2nd call must be a replay"
    replayed = log[1][1]
    assert replayed[0] is q2 and replayed[1] is k2 and replayed[2] is v2 and replayed[3] is out2
    assert replayed[4] is log[0][1][4] and replayed[5] == 64         # LSE scratch and scalars kept
    kept = next(iter(dd._bound.values())).calls[0][1][9:]
    assert kept[:4] == [None] * 4, "the first call's q/k/v/out must not be held between calls"
    dd.decode_dense(q2, k2, v2, 0.5)                                   # another scale: planned again
    k3, v3 = _hf_cache(2, 2, 41, 16, torch.float32)                    # another length: planned again,
    dd.decode_dense(q2, k3, v3, 0.25)                                  # the same page (64): the kernel replays
    k4, v4 = _hf_cache(2, 2, 65, 16, torch.float32)                    # another page (128): compiled again
    dd.decode_dense(q2, k4, v4, 0.25)
    assert [e[0] for e in log] == ["planned", "replay", "planned", "replay", "planned"]
    assert fwd_calls == [64, 64, 64, 128]


def _fake_decode(monkeypatch, log):
    from pagoda.kernels.attention import decode as kdecode
    from pagoda.kernels.launch import fast as _launch

    kernel = fake_fast_launch(monkeypatch, log, ["Q", "K", "V", "O", "L", "n", "scale"])

    def fake_decode_fwd(q, k, v, ks, vs, indptr, indices, last, s, hk, out, lse, **kw):
        _launch.launch(kernel, (q.shape[0], hk), q, k, v, out, lse, s, kw["sm_scale"])

    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: 1)
    monkeypatch.setattr(kdecode, "decode_fwd", fake_decode_fwd)


def _hf_step(b, hq, hk, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g).half()
    return q, torch.randn(b, hk, s, d, generator=g).half(), torch.randn(b, hk, s, d, generator=g).half()


def test_hf_layout_repeat_calls_replay_with_the_hf_tensors_swapped_in(monkeypatch):
    """`decode_hf`: the first call of a shape records; a repeat (the other layers of a decode step) issues the
    recorded launch with HF's own query/key/value tensors and the new output (same data pointers as the
    views the kernel was planned with), keeps none of the first call's tensors, and a new length, scale or
    a misaligned tensor plans again."""
    log = []
    _fake_decode(monkeypatch, log)
    q1, k1, v1 = _hf_step(2, 4, 2, 40, 16, 1)
    q2, k2, v2 = _hf_step(2, 4, 2, 40, 16, 2)
    out1 = dd.decode_hf(q1, k1, v1, 0.25)
    out2 = dd.decode_hf(q2, k2, v2, 0.25)
    assert out1.shape == out2.shape == (2, 1, 4, 16) and out2.dtype == torch.float16
    assert [e[0] for e in log] == ["planned", "replay"]
    planned, replayed = log[0][1], log[1][1]
    assert planned[0].data_ptr() == q1.data_ptr() and planned[3].data_ptr() == out1.data_ptr()
    assert replayed[0] is q2 and replayed[1] is k2 and replayed[2] is v2 and replayed[3] is out2
    assert replayed[4] is planned[4] and replayed[5] == 64
    kept = next(iter(dd._hf.values()))[0].calls[0][1][9:]
    assert kept[:4] == [None] * 4
    dd.decode_hf(q2, k2, v2, 0.5)                                           # another scale
    q3, k3, v3 = _hf_step(2, 4, 2, 65, 16, 3)                               # another length and page
    dd.decode_hf(q3, k3, v3, 0.25)
    raw = torch.empty(2 * 4 * 16 + 1, dtype=torch.float16)
    q4 = raw[1:].view(2, 4, 1, 16)                                          # 2-byte aligned
    q4.copy_(q2)
    dd.decode_hf(q4, k2, v2, 0.25)
    assert [e[0] for e in log] == ["planned", "replay", "planned", "planned", "planned"]


@pytest.mark.parametrize("change", ["fp32", "head_dim", "gqa", "strided_q", "q_len"])
def test_hf_layout_declines_what_the_decode_kernel_does_not_take(change):
    q, k, v = _hf_step(2, 4, 2, 9, 16, 0)
    if change == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    elif change == "head_dim":
        q, k, v = q[..., :12], k[..., :12], v[..., :12]
    elif change == "gqa":
        q = torch.randn(2, 3, 1, 16).half()
    elif change == "strided_q":
        q = torch.randn(2, 4, 1, 32).half()[..., ::2]
    else:
        q = torch.randn(2, 4, 2, 16).half()
    assert dd.decode_hf(q, k, v, None) is None


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (no CUDA)")
def test_hf_layout_kernel_path_matches_reference(monkeypatch):
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    q, k, v = _hf_step(3, 8, 2, 37, 32, 4)
    out = dd.decode_hf(q, k, v, None)
    want = _want(q[:, :, 0], k.transpose(1, 2), v.transpose(1, 2), 32 ** -0.5)
    assert out.shape == (3, 1, 8, 32) and rel_err(out[:, 0].float(), want) < 2e-3


def test_hf_layout_cpu_reference_path():
    q, k, v = _hf_step(2, 4, 4, 11, 16, 5)
    out = dd.decode_hf(q.float().half(), k, v, 0.3)
    want = _want(q[:, :, 0], k.transpose(1, 2), v.transpose(1, 2), 0.3)
    assert out.shape == (2, 1, 4, 16) and rel_err(out[:, 0].float(), want) < 2e-3

"""The public paged/RoPE/decode/prefill ops end to end through their Triton path, under the interpreter:
`pagoda._switches.TRITON_ON_CPU` sends CPU tensors to the kernels, and each result is compared with the same call on
the reference path (plan decisions, workspace views, graph-mode buffers and launches are all exercised)."""
import os

import pytest
import torch

from pagoda import _switches
from pagoda.ops import _decode_plan, rope
from pagoda.ops import decode as dec
from pagoda.ops import page as page_ops
from pagoda.ops import prefill as pf
from tests.helpers import assert_finite_lse_close, rel_err
from tests.paged_utils import empty_cache, fill_cache, random_page_table

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="interpreter tests run only where TRITON_INTERPRET=1 (no CUDA)")


def _both(monkeypatch, fn):
    """fn() on the reference path, then on the Triton path (interpreter)."""
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", False)
    want = fn()
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    got = fn()
    return got, want


def _paged(lens, ps, hk, d, layout, dtype=torch.float32):
    indptr, indices, last, max_pages = random_page_table(lens, ps)
    cache = empty_cache(max_pages, ps, hk, d, layout, dtype)
    fill_cache(cache, [torch.randn(n, hk, d, dtype=dtype) for n in lens],
               [torch.randn(n, hk, d, dtype=dtype) for n in lens], indptr, indices, ps, layout)
    return cache.nan_to_num(), (indptr, indices, last)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_append_op(monkeypatch, layout):
    cache, (indptr, indices, last) = _paged([3, 20], 4, 2, 16, layout, torch.float16)
    ak, av = torch.randn(5, 2, 16, dtype=torch.float16), torch.randn(5, 2, 16, dtype=torch.float16)
    b, p = page_ops.get_batch_indices_positions(torch.tensor([0, 1, 5], dtype=torch.int32),
                                                torch.tensor([3, 20], dtype=torch.int32), 6)

    def run():
        c = cache.clone()
        page_ops.append_paged_kv_cache(ak, av, b, p, c, indices, indptr, last, kv_layout=layout)
        return c

    got, want = _both(monkeypatch, run)
    assert torch.equal(got, want) and not torch.equal(got, cache)


@pytest.mark.parametrize("interleave", [False, True])
def test_rope_ops(monkeypatch, interleave):
    q, k = torch.randn(9, 4, 32), torch.randn(9, 2, 32)
    indptr, offsets = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([7, 100], dtype=torch.int32)

    def run():
        a = rope.apply_rope(q, k, indptr, offsets, rotary_dim=16, interleave=interleave)
        qi, ki = q.clone(), k.clone()
        rope.apply_llama31_rope_inplace(qi, ki, indptr, offsets, interleave=interleave)
        return a[0], a[1], qi, ki

    got, want = _both(monkeypatch, run)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("fixed_split_size", [None, 2])
@pytest.mark.parametrize("mode", ["NONE", "ALIBI"])
def test_decode_wrapper(monkeypatch, layout, fixed_split_size, mode):
    lens = [0, 1, 40, 9]
    cache, meta = _paged(lens, 4, 2, 32, layout)
    q = torch.randn(4, 8, 32)

    def run():
        w = dec.BatchDecodeWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8), layout)
        w.plan(*meta, 8, 2, 32, 4, pos_encoding_mode=mode, window_left=30, q_data_type=torch.float32,
               fixed_split_size=fixed_split_size)
        return w.run(q, cache, return_lse=True)

    (out, lse), (want, want_lse) = _both(monkeypatch, run)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse, atol=1e-4)


def test_decode_graph_mode_replan(monkeypatch):
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    bufs = dict(paged_kv_indptr_buffer=torch.zeros(5, dtype=torch.int32),
                paged_kv_indices_buffer=torch.zeros(64, dtype=torch.int32),
                paged_kv_last_page_len_buffer=torch.zeros(4, dtype=torch.int32))
    w = dec.BatchDecodeWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8), "NHD", use_cuda_graph=True,
                                               **bufs)
    eager = dec.BatchDecodeWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8), "NHD")
    for lens in ([5, 50, 0, 1], [70, 3]):
        cache, meta = _paged(lens, 8, 2, 32, "NHD")
        q = torch.zeros(4, 4, 32)
        q[:len(lens)] = torch.randn(len(lens), 4, 32)
        w.plan(*meta, 4, 2, 32, 8, q_data_type=torch.float32)
        out = w.run(q, cache)
        monkeypatch.setattr(_switches, "TRITON_ON_CPU", False)
        eager.plan(*meta, 4, 2, 32, 8, q_data_type=torch.float32)
        want = eager.run(q[:len(lens)], cache)
        monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
        assert rel_err(out[:len(lens)], want) < 1e-5 and (out[len(lens):] == 0).all()


def test_single_decode(monkeypatch):
    q, k, v = torch.randn(8, 64, dtype=torch.float16), torch.randn(2, 37, 64, dtype=torch.float16), \
        torch.randn(2, 37, 64, dtype=torch.float16)
    got, want = _both(monkeypatch, lambda: dec.single_decode_with_kv_cache(q, k, v, kv_layout="HND", return_lse=True,
                                                                            pos_encoding_mode="ROPE_LLAMA"))
    assert rel_err(got[0], want[0]) < 2e-3
    assert_finite_lse_close(got[1], want[1], atol=2e-3)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("graph", [False, True])
def test_paged_prefill_wrapper(monkeypatch, layout, graph):
    kv = [0, 1, 30, 12]
    cache, meta = _paged(kv, 5, 2, 32, layout)
    qptr = torch.tensor([0, 0, 1, 21, 33], dtype=torch.int32)  # 0, 1, 20, 12 queries
    q = torch.randn(36, 4, 32)  # 3 padding rows past qo_indptr[-1]

    def run():
        kw = {}
        if graph:
            kw = dict(use_cuda_graph=True, qo_indptr_buf=torch.zeros(6, dtype=torch.int32),
                      paged_kv_indptr_buf=torch.zeros(6, dtype=torch.int32),
                      paged_kv_indices_buf=torch.zeros(32, dtype=torch.int32),
                      paged_kv_last_page_len_buf=torch.zeros(5, dtype=torch.int32))
        w = pf.BatchPrefillWithPagedKVCacheWrapper(torch.empty(16, dtype=torch.uint8), layout, **kw)
        w.plan(qptr, *meta, 4, 2, 32, 5, causal=True, q_data_type=torch.float32)
        return w.run(q, cache, return_lse=True)

    (out, lse), (want, want_lse) = _both(monkeypatch, run)
    assert rel_err(out[:33], want[:33]) < 1e-5 and (out[33:] == 0).all()
    assert_finite_lse_close(lse[:33], want_lse[:33], atol=1e-4)


def test_single_prefill_and_ragged_rope(monkeypatch):
    q, k, v = torch.randn(10, 4, 32), torch.randn(25, 2, 32), torch.randn(25, 2, 32)
    got, want = _both(monkeypatch, lambda: pf.single_prefill_with_kv_cache(q, k, v, causal=True, window_left=8,
                                                                            return_lse=True))
    assert rel_err(got[0], want[0]) < 1e-5

    def ragged():
        w = pf.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(16, dtype=torch.uint8))
        w.plan(torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 25], dtype=torch.int32), 4, 2, 32,
               causal=True, pos_encoding_mode="ROPE_LLAMA", q_data_type=torch.float32)
        return w.run(q, k, v)

    got, want = _both(monkeypatch, ragged)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("longest,batch,hk,sms", [(1, 1, 1, 132), (4096, 1, 8, 132), (32768, 1, 8, 132),
                                                  (4096, 64, 8, 132), (100000, 2, 1, 132), (700, 3, 2, 16)])
def test_split_choice_covers_every_key(longest, batch, hk, sms):
    chunk, splits = _decode_plan.choose_chunk(longest, batch, hk, sms, 16, None, False, _decode_plan.MAX_SPLITS)
    if splits:
        assert 2 <= splits <= _decode_plan.MAX_SPLITS and chunk * splits >= longest > chunk * (splits - 1)
    else:
        assert chunk == 0
    assert _decode_plan.choose_chunk(longest, batch, hk, sms, 16, None, True, 64) == (0, 0)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("interleave,rotary_dim,llama31", [(False, None, False), (True, 16, False), (False, 24, True)])
def test_fused_rope_append(monkeypatch, layout, interleave, rotary_dim, llama31):
    cache, (indptr, indices, last) = _paged([3, 20], 4, 2, 32, layout, torch.float16)
    ak, av = torch.randn(6, 2, 32, dtype=torch.float16), torch.randn(6, 2, 32, dtype=torch.float16)
    q = torch.randn(6, 4, 32, dtype=torch.float16)
    b, p = page_ops.get_batch_indices_positions(torch.tensor([0, 1, 5], dtype=torch.int32),
                                                torch.tensor([3, 20], dtype=torch.int32), 6)

    def run():
        c, qq = cache.clone(), q.clone()
        page_ops.append_paged_kv_cache_with_rope(ak, av, b, p, c, indices, indptr, last, kv_layout=layout, q=qq,
                                                 rotary_dim=rotary_dim, interleave=interleave, llama31=llama31)
        return c, qq

    (c, qq), (cw, qw) = _both(monkeypatch, run)
    torch.testing.assert_close(c, cw, rtol=0, atol=2e-3)
    torch.testing.assert_close(qq, qw, rtol=0, atol=2e-3)
    assert not torch.equal(c, cache)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("sq,s_new,causal,window,num_splits", [(1, 1, True, (-1, -1), 0), (1, 0, False, (5, -1), 3),
                                                               (4, 4, True, (-1, -1), 0), (3, 1, False, (6, 2), 0)])
def test_flash_attn_with_kvcache(monkeypatch, paged, sq, s_new, causal, window, num_splits):
    from pagoda.ops.kvcache import flash_attn_with_kvcache

    b, hq, hk, d = 3, 4, 2, 32
    seqlens = torch.tensor([0, 9, 30], dtype=torch.int32)
    if paged:
        k_cache = torch.randn(30, 5, hk, d)
        extra = dict(block_table=torch.randperm(30)[:21].to(torch.int32).view(3, 7))
    else:
        k_cache = torch.randn(5, 40, hk, d)
        extra = dict(cache_batch_idx=torch.tensor([4, 0, 2], dtype=torch.int32))
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(b, sq, hq, d)
    k = torch.randn(b, s_new, hk, d) if s_new else None
    v = torch.randn(b, s_new, hk, d) if s_new else None
    ang = torch.arange(64)[:, None] * (1e4 ** (-torch.arange(0, 16, 2) / 16))[None, :]
    rot = dict(rotary_cos=ang.cos(), rotary_sin=ang.sin()) if s_new else {}
    slopes = torch.rand(b, hq)

    def run():
        kc, vc = k_cache.clone(), v_cache.clone()
        out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, causal=causal, window_size=window,
                                           alibi_slopes=slopes, num_splits=num_splits,
                                           return_softmax_lse=True, **rot, **extra)
        return out, lse, kc

    (out, lse, kc), (want, want_lse, kc_want) = _both(monkeypatch, run)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse, atol=1e-4)
    assert torch.equal(kc, kc_want)

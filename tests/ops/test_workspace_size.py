"""``workspace_size`` / ``reset_workspace_buffer`` of the FlashInfer-style wrappers: the bytes a plan's split-KV
partials take (a plan with a buffer of exactly that size keeps the split and gives the float64 oracle's attention,
on the interpreted kernels with a GPU-sized SM count), FlashInfer's 16-byte alignment errors."""
import inspect
import math

import pytest
import torch

import pagoda
from pagoda.ops import _decode_plan
from tests.paged_utils import empty_cache, fill_cache, random_page_table

HQ, HK, D, PS = 4, 2, 32, 4


def _bytes(n):
    return torch.empty(n, dtype=torch.uint8)


def _unaligned(n):
    t = torch.empty(n + 16, dtype=torch.uint8)
    off = 1 if t.data_ptr() % 16 == 0 else 0
    return t[off:off + n]


def _table(lens):
    indptr, indices, last, max_pages = random_page_table(lens, PS)
    cache = empty_cache(max_pages, PS, HK, D, "NHD", torch.float32)
    keys = [torch.randn(n, HK, D) for n in lens]
    vals = [torch.randn(n, HK, D) for n in lens]
    fill_cache(cache, keys, vals, indptr, indices, PS, "NHD")
    return cache, keys, vals, (indptr, indices, last)


def _attend64(rows, k, v, causal_offset=None):
    kk = k.double().repeat_interleave(HQ // HK, 1)
    vv = v.double().repeat_interleave(HQ // HK, 1)
    s = torch.einsum("nhd,mhd->hnm", rows.double(), kk) / math.sqrt(D)
    if causal_offset is not None:
        vis = torch.arange(k.shape[0])[None, :] <= (torch.arange(rows.shape[0]) + causal_offset)[:, None]
        s = s.masked_fill(~vis[None], -math.inf)
    return torch.einsum("hnm,mhd->nhd", s.softmax(-1), vv)


def test_signatures_match_flashinfer():
    dec = inspect.signature(pagoda.BatchDecodeWithPagedKVCacheWrapper.workspace_size).parameters
    plan = inspect.signature(pagoda.BatchDecodeWithPagedKVCacheWrapper.plan).parameters
    assert [p for p in plan if p not in ("non_blocking",)] == list(dec)
    pre = inspect.signature(pagoda.BatchPrefillWithPagedKVCacheWrapper.workspace_size).parameters
    pplan = inspect.signature(pagoda.BatchPrefillWithPagedKVCacheWrapper.plan).parameters
    assert [p for p in pplan if p != "non_blocking"] == list(pre)
    for cls in (pagoda.BatchPrefillWithPagedKVCacheWrapper, pagoda.BatchPrefillWithRaggedKVCacheWrapper,
                pagoda.BatchDecodeWithPagedKVCacheWrapper):
        assert list(inspect.signature(cls.reset_workspace_buffer).parameters)[1:] == [
            "float_workspace_buffer", "int_workspace_buffer"]


def test_decode_workspace_size_plans_with_an_exact_buffer(triton_on_cpu, monkeypatch):
    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: 132)     # an H100's split heuristics
    lens = [300, 41, 77]
    cache, keys, vals, table = _table(lens)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(_bytes(32 << 20))
    fl, it = w.workspace_size(*table, HQ, HK, D, PS, q_data_type=torch.float32)
    splits = fl // (len(lens) * HQ * (D + 1) * 4)
    assert fl == splits * len(lens) * HQ * (D + 1) * 4 and splits >= 2 and it > 0
    w.reset_workspace_buffer(_bytes(fl), _bytes(it))
    w.plan(*table, HQ, HK, D, PS, q_data_type=torch.float32)
    assert w._splits == splits
    q = torch.randn(len(lens), HQ, D)
    out = w.run(q, cache)
    for b in range(len(lens)):
        torch.testing.assert_close(out[b].double(), _attend64(q[b][None], keys[b], vals[b])[0], atol=1e-4, rtol=1e-4)
    # One byte less: the plan splits less (never writes past the buffer).
    w.reset_workspace_buffer(_bytes(fl - 16), _bytes(it))
    w.plan(*table, HQ, HK, D, PS, q_data_type=torch.float32)
    assert w._splits < splits


def test_prefill_workspace_size_plans_with_an_exact_buffer(triton_on_cpu, monkeypatch):
    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: 132)
    qo_lens, kv_lens = [3, 2], [1200, 700]
    cache, keys, vals, table = _table(kv_lens)
    qo_indptr = torch.tensor([0, 3, 5], dtype=torch.int32)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(_bytes(32 << 20), backend="fa2")
    fl, it = w.workspace_size(qo_indptr, *table, HQ, HK, D, PS, causal=True, q_data_type=torch.float16)
    assert fl > 0 and fl % (5 * HQ * (D + 1) * 4) == 0 and it > 0
    w.reset_workspace_buffer(_bytes(fl), _bytes(it))
    w.plan(qo_indptr, *table, HQ, HK, D, PS, causal=True, q_data_type=torch.float16)
    assert w._splits == fl // (5 * HQ * (D + 1) * 4)
    q = torch.randn(5, HQ, D, dtype=torch.float16)
    out = w.run(q, tuple(c.half() for c in (cache[:, 0], cache[:, 1])))
    for b, (n, m) in enumerate(zip(qo_lens, kv_lens, strict=True)):
        want = _attend64(q[qo_indptr[b]:qo_indptr[b + 1]], keys[b].half(), vals[b].half(), m - n)
        torch.testing.assert_close(out[qo_indptr[b]:qo_indptr[b + 1]].double(), want, atol=2e-3, rtol=2e-3)


def test_workspace_size_without_splits_is_zero_and_leaves_the_plan():
    cache, keys, vals, table = _table([5, 6])
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(_bytes(1 << 20))
    w.plan(*table, HQ, HK, D, PS, q_data_type=torch.float32)
    assert w.workspace_size(*table, HQ, HK, D, PS, q_data_type=torch.float32, disable_split_kv=True)[0] == 0
    q = torch.randn(2, HQ, D)
    torch.testing.assert_close(w.run(q, cache).double()[1], _attend64(q[1][None], keys[1], vals[1])[0],
                               atol=1e-5, rtol=1e-5)


def test_unaligned_buffers_raise_flashinfers_error():
    with pytest.raises(ValueError, match="float_workspace_buffer must be 16-byte aligned"):
        pagoda.BatchPrefillWithPagedKVCacheWrapper(_unaligned(1024), backend="fa2")
    with pytest.raises(ValueError, match="float_workspace_buffer must be 16-byte aligned"):
        pagoda.BatchDecodeWithPagedKVCacheWrapper(_unaligned(1024))
    for w in (pagoda.BatchDecodeWithPagedKVCacheWrapper(_bytes(1024)),
              pagoda.BatchPrefillWithPagedKVCacheWrapper(_bytes(1024))):
        with pytest.raises(ValueError, match="float_workspace_buffer must be 16-byte aligned"):
            w.reset_workspace_buffer(_unaligned(1024), _bytes(1024))
        with pytest.raises(ValueError, match="int_workspace_buffer must be 16-byte aligned"):
            w.reset_workspace_buffer(_bytes(1024), _unaligned(1024))


def test_ragged_reset_keeps_the_plan():
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(_bytes(1024))
    ptr = torch.tensor([0, 2], dtype=torch.int32)
    w.plan(ptr, torch.tensor([0, 3], dtype=torch.int32), HQ, HK, D, q_data_type=torch.float32)
    w.reset_workspace_buffer(_bytes(2048), _bytes(64))
    q, k, v = torch.randn(2, HQ, D), torch.randn(3, HK, D), torch.randn(3, HK, D)
    torch.testing.assert_close(w.run(q, k, v).double(), _attend64(q, k, v), atol=1e-5, rtol=1e-5)

"""FlashInfer's `CUDAGraphBatchDecodeWithPagedKVCacheWrapper` and `fast_decode_plan` (SGLang's plan swap): float64
attention oracle on the reference path and the interpreted kernels, the fast plan's contract (no copies into a
CUDA-graph wrapper's buffers, only indptr read on the host, FlashInfer's errors)."""
import functools
import inspect
import math

import pytest
import torch

import pagoda
from tests.paged_utils import empty_cache, fill_cache, random_page_table

HQ, HK, D, PS = 4, 2, 32, 4


def _attend64(q, keys, vals, sm_scale=None):
    """float64 decode oracle: ``q [b, Hq, D]`` against each request's keys/values ``[n, Hk, D]``; ``(out, lse2)``."""
    scale = sm_scale or q.shape[-1] ** -0.5
    outs, lses = [], []
    for b, (k, v) in enumerate(zip(keys, vals, strict=True)):
        if k.shape[0] == 0:
            outs.append(torch.zeros(q.shape[1], q.shape[2], dtype=torch.float64))
            lses.append(torch.full((q.shape[1],), -math.inf, dtype=torch.float64))
            continue
        kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
        vv = v.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), kk) * scale
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), vv))
        lses.append(torch.logsumexp(s, -1) / math.log(2.0))
    return torch.stack(outs), torch.stack(lses)


def _batch(lens, dtype=torch.float32):
    indptr, indices, last, max_pages = random_page_table(lens, PS, extra_pages=8)
    cache = empty_cache(max_pages, PS, HK, D, "NHD", dtype)
    keys = [torch.randn(n, HK, D, dtype=dtype) for n in lens]
    vals = [torch.randn(n, HK, D, dtype=dtype) for n in lens]
    fill_cache(cache, keys, vals, indptr, indices, PS, "NHD")
    return torch.randn(len(lens), HQ, D, dtype=dtype), cache, keys, vals, (indptr, indices, last)


def _ws():
    return torch.empty(8 << 20, dtype=torch.uint8)


def _graph_bufs(batch, pages=64):
    return (torch.zeros(batch + 1, dtype=torch.int32), torch.zeros(pages, dtype=torch.int32),
            torch.zeros(batch, dtype=torch.int32))


def test_signatures_match_flashinfer():
    assert list(inspect.signature(pagoda.CUDAGraphBatchDecodeWithPagedKVCacheWrapper).parameters) == [
        "workspace_buffer", "indptr_buffer", "indices_buffer", "last_page_len_buffer", "kv_layout",
        "use_tensor_cores"]
    assert list(inspect.signature(pagoda.fast_decode_plan).parameters) == [
        "self", "indptr", "indices", "last_page_len", "num_qo_heads", "num_kv_heads", "head_dim", "page_size",
        "pos_encoding_mode", "window_left", "logits_soft_cap", "q_data_type", "kv_data_type", "data_type",
        "sm_scale", "rope_scale", "rope_theta", "non_blocking", "fixed_split_size", "disable_split_kv",
        "q_len_per_req", "global_override_indptr_cpu"]


def test_cuda_graph_wrapper_replans_into_its_buffers():
    bufs = _graph_bufs(3)
    w = pagoda.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(_ws(), *bufs, "NHD")
    assert w.is_cuda_graph_enabled and not w.use_tensor_cores
    for lens in ([5, 9, 1], [13, 2]):
        q, cache, keys, vals, table = _batch(lens)
        w.plan(*table, HQ, HK, D, PS, q_data_type=torch.float32)
        assert torch.equal(bufs[0][:len(lens) + 1], table[0])
        out, lse = w.run(q, cache, return_lse=True)
        want, want_lse = _attend64(q, keys, vals)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", [False, True])
def test_fast_plan_equals_plan(kernel, monkeypatch):
    if kernel:
        from pagoda import _switches
        monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws(), "NHD")
    q, cache, keys, vals, table = _batch([6, 1, 17])
    w.plan(*table, HQ, HK, D, PS, q_data_type=torch.float32)
    w.plan = functools.partial(pagoda.fast_decode_plan, w)      # as SGLang does
    lens = [23, 0, 3]
    q, cache, keys, vals, table = _batch(lens)
    # fixed_split_size: several splits, whose chunk the fast plan sizes from whole pages (no last_page_len read).
    w.plan(*table, HQ, HK, D, PS, q_data_type=torch.float32, fixed_split_size=2, sm_scale=0.3,
           global_override_indptr_cpu=table[0].clone())
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = _attend64(q, keys, vals, sm_scale=0.3)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], atol=1e-4, rtol=1e-4)
    assert torch.isneginf(lse[~finite]).all()


def test_fast_plan_of_a_cuda_graph_wrapper_reads_the_callers_buffers():
    lens = [7, 12]
    bufs = _graph_bufs(2)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws(), "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=bufs[0],
                                                  paged_kv_indices_buffer=bufs[1],
                                                  paged_kv_last_page_len_buffer=bufs[2])
    q, cache, keys, vals, (indptr, indices, last) = _batch(lens)
    w.plan(indptr, indices, last, HQ, HK, D, PS, q_data_type=torch.float32)
    q, cache, keys, vals, (indptr, indices, last) = _batch([3, 9])
    bufs[0].copy_(indptr)                   # the caller writes the buffers, then plans with them
    bufs[1][:indices.shape[0]].copy_(indices)
    bufs[2].copy_(last)
    before = [b.clone() for b in bufs]
    pagoda.fast_decode_plan(w, bufs[0], bufs[1][:indices.shape[0]], bufs[2], HQ, HK, D, PS,
                            q_data_type=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(before, bufs, strict=True))
    torch.testing.assert_close(w.run(q, cache).double(), _attend64(q, keys, vals)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="batch size should be fixed in cudagraph mode"):
        pagoda.fast_decode_plan(w, indptr[:2], indices, last[:1], HQ, HK, D, PS, q_data_type=torch.float32)


def test_fast_plan_errors_follow_flashinfer():
    q, cache, keys, vals, table = _batch([4, 4])
    tc = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws(), "NHD", use_tensor_cores=True)
    with pytest.raises(ValueError, match="prior plan"):
        pagoda.fast_decode_plan(tc, *table, HQ, HK, D, PS, q_data_type=torch.float32, q_len_per_req=2)
    plain = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws(), "NHD")
    with pytest.raises(ValueError, match="tensor"):
        pagoda.fast_decode_plan(plain, *table, HQ, HK, D, PS, q_data_type=torch.float32, q_len_per_req=2)
    with pytest.raises(ValueError, match="global_override_indptr_cpu"):
        pagoda.fast_decode_plan(plain, *table, HQ, HK, D, PS, global_override_indptr_cpu=torch.zeros(5))
    with pytest.raises(TypeError, match="BatchDecodeWithPagedKVCacheWrapper"):
        pagoda.fast_decode_plan(object(), *table, HQ, HK, D, PS)


def test_fast_plan_multi_token_rows_after_a_plan():
    n, lens = 2, [5, 9]
    q1, cache, keys, vals, table = _batch(lens)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws(), "NHD", use_tensor_cores=True)
    w.plan(*table, HQ, HK, D, PS, q_data_type=torch.float32, q_len_per_req=n)
    pagoda.fast_decode_plan(w, *table, HQ, HK, D, PS, q_data_type=torch.float32, q_len_per_req=n)
    q = torch.randn(len(lens) * n, HQ, D)
    out = w.run(q, cache)
    for b, L in enumerate(lens):
        for t in range(n):      # token t of request b sees keys 0 .. L - n + t
            want, _ = _attend64(q[b * n + t][None], [keys[b][:L - n + t + 1]], [vals[b][:L - n + t + 1]])
            torch.testing.assert_close(out[b * n + t].double(), want[0], atol=1e-5, rtol=1e-5)

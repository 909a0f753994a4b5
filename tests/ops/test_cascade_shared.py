"""FlashInfer's two-level shared-prefix wrappers: the prefix as dense k/v, each request's own keys paged; against a
float64 oracle over [prefix; unique] (causal, in the prefill stage, on the unique part only, aligned to its end)."""
import inspect
import math

import pytest
import torch

import pagoda
from tests.paged_utils import empty_cache, fill_cache, random_page_table

HQ, HK, D, PS = 4, 2, 32, 4


def _oracle(q_rows, k, v, visible):
    """float64 attention of ``q_rows [n, Hq, D]`` over ``k, v [m, Hk, D]`` with bool ``visible [n, m]``."""
    kk = k.double().repeat_interleave(HQ // HK, 1)
    vv = v.double().repeat_interleave(HQ // HK, 1)
    s = torch.einsum("nhd,mhd->hnm", q_rows.double(), kk) / math.sqrt(D)
    s = s.masked_fill(~visible[None], -math.inf)
    return torch.einsum("hnm,mhd->nhd", s.softmax(-1), vv)


def _unique(lens, layout):
    indptr, indices, last, max_pages = random_page_table(lens, PS)
    cache = empty_cache(max_pages, PS, HK, D, layout, torch.float32)
    keys = [torch.randn(n, HK, D) for n in lens]
    vals = [torch.randn(n, HK, D) for n in lens]
    fill_cache(cache, keys, vals, indptr, indices, PS, layout)
    return cache, keys, vals, (indptr, indices, last)


def _shared(n, layout):
    k, v = torch.randn(n, HK, D), torch.randn(n, HK, D)
    return (k, v, k, v) if layout == "NHD" else (k, v, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())


def test_signatures_match_flashinfer():
    d = pagoda.BatchDecodeWithSharedPrefixPagedKVCacheWrapper
    p = pagoda.BatchPrefillWithSharedPrefixPagedKVCacheWrapper
    assert list(inspect.signature(d).parameters) == ["float_workspace_buffer", "kv_layout"]
    assert list(inspect.signature(d.begin_forward).parameters)[1:] == [
        "unique_kv_indptr", "unique_kv_indices", "unique_kv_last_page_len", "num_qo_heads", "num_kv_heads",
        "head_dim", "page_size", "data_type"]
    assert list(inspect.signature(d.forward).parameters)[1:] == ["q", "k_shared", "v_shared", "unique_kv_cache"]
    assert list(inspect.signature(p.forward).parameters)[1:] == [
        "q", "k_shared", "v_shared", "unique_kv_cache", "causal", "use_fp16_qk_reduction", "sm_scale", "rope_scale",
        "rope_theta"]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_shared_prefix_decode(layout):
    lens, shared = [5, 0, 11], 9
    cache, keys, vals, table = _unique(lens, layout)
    k_sh, v_sh, k_arg, v_arg = _shared(shared, layout)
    w = pagoda.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(torch.empty(4 << 20, dtype=torch.uint8), layout)
    w.begin_forward(*table, HQ, HK, D, PS, data_type=torch.float32)
    q = torch.randn(len(lens), HQ, D)
    out = w.forward(q, k_arg, v_arg, cache)
    for b in range(len(lens)):
        k, v = torch.cat([k_sh, keys[b]]), torch.cat([v_sh, vals[b]])
        want = _oracle(q[b][None], k, v, torch.ones(1, k.shape[0], dtype=torch.bool))
        torch.testing.assert_close(out[b].double(), want[0], atol=1e-5, rtol=1e-5)
    w.end_forward()


@pytest.mark.parametrize("causal", [False, True])
def test_shared_prefix_prefill(causal):
    qo_lens, kv_lens, shared = [3, 4, 1], [3, 6, 2], 7
    cache, keys, vals, table = _unique(kv_lens, "NHD")
    k_sh, v_sh, _, _ = _shared(shared, "NHD")
    qo_indptr = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    w = pagoda.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(torch.empty(4 << 20, dtype=torch.uint8), "NHD")
    w.begin_forward(qo_indptr, *table, HQ, HK, D, PS)
    q = torch.randn(8, HQ, D)
    out = w.forward(q, k_sh, v_sh, cache, causal=causal)
    for b, (n, m) in enumerate(zip(qo_lens, kv_lens, strict=True)):
        rows = q[qo_indptr[b]:qo_indptr[b + 1]]
        k, v = torch.cat([k_sh, keys[b]]), torch.cat([v_sh, vals[b]])
        vis = torch.ones(n, shared + m, dtype=torch.bool)
        if causal:   # query i sits at unique position i + m - n
            vis[:, shared:] = torch.arange(m)[None, :] <= (torch.arange(n) + m - n)[:, None]
        torch.testing.assert_close(out[qo_indptr[b]:qo_indptr[b + 1]].double(), _oracle(rows, k, v, vis),
                                   atol=1e-5, rtol=1e-5)


def test_forward_before_begin_forward_raises():
    w = pagoda.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="begin_forward"):
        w.forward(torch.randn(1, HQ, D), torch.randn(2, HK, D), torch.randn(2, HK, D),
                  torch.randn(1, 2, PS, HK, D))

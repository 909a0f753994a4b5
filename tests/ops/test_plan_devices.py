"""Where a wrapper's plan-time tables may lie (FlashInfer's rule): each of indptr / indices / last_page_len (and a
prefill's qo_indptr) on the host or on the wrapper's device, independently, with or without a CUDA graph; a table
on any other device is an error naming it. On the CPU a wrapper's device is the host, so the rule itself is checked
against a CUDA device object (no GPU needed) and the ``meta`` device stands in for "another device"; the mixed
host/GPU plans run in `tests.ops.test_flashinfer_graph_gpu`."""
import math

import pytest
import torch

import pagoda
from pagoda.ops import _paged
from pagoda.ops import _prefill_common as _common
from tests.paged_utils import empty_cache, fill_cache, random_page_table

HQ, HK, D, PS = 4, 2, 32, 4
CUDA0 = torch.device("cuda", 0)


def _table(lens, extra_pages=4):
    indptr, indices, last, max_pages = random_page_table(lens, PS, extra_pages=extra_pages)
    return (indptr, indices, last), max_pages


def _ws():
    return torch.empty(8 << 20, dtype=torch.uint8)


def test_host_tables_are_accepted_for_a_device_wrapper():
    (indptr, indices, last), _ = _table([5, 0, 9])
    for t in (indptr, indices, last):
        _paged.check_plan_device("t", t, CUDA0)          # on the host
    _paged.check_plan_device("t", indptr, torch.device("cpu"))   # on the wrapper's own device
    assert _paged.check_kv_csr(indptr, indices, last, PS, None, CUDA0, host_ok=True) == 3
    assert _common.check_indptr("qo_indptr", torch.tensor([0, 1, 3], dtype=torch.int32), CUDA0, host_ok=True) == [
        0, 1, 3]
    # Without host_ok (the paged-append ops, whose kernels read the tables in place) the device must match.
    with pytest.raises(ValueError, match="kv_indptr must be on cuda:0, got cpu"):
        _paged.check_kv_csr(indptr, indices, last, PS, None, CUDA0)
    with pytest.raises(ValueError, match="qo_indptr must be on cuda:0, got cpu"):
        _common.check_indptr("qo_indptr", indptr, CUDA0)


def test_a_table_on_another_device_is_an_error():
    (indptr, indices, last), _ = _table([5, 9])
    with pytest.raises(ValueError, match=r"indices must be on the host \(cpu\) or on the wrapper's device cuda:0, "
                                         r"got meta"):
        _paged.check_kv_csr(indptr, indices.to("meta"), last, PS, None, CUDA0, names=("indptr", "indices", "last"),
                            host_ok=True)
    with pytest.raises(ValueError, match="kv_indptr must be on the host"):
        _common.check_indptr("kv_indptr", indptr.to("meta"), CUDA0, host_ok=True)


def test_wrong_tables_keep_their_errors_with_host_ok():
    (indptr, indices, last), _ = _table([5, 9])
    with pytest.raises(TypeError, match="last_page_len"):
        _paged.check_kv_csr(indptr, indices, last.long(), PS, None, CUDA0, names=("indptr", "indices",
                                                                                  "last_page_len"), host_ok=True)
    with pytest.raises(ValueError, match="last_page_len must have length batch_size = 2"):
        _paged.check_kv_csr(indptr, indices, last[:1], PS, None, CUDA0, names=("indptr", "indices",
                                                                               "last_page_len"), host_ok=True)
    bad_last = last.clone()
    bad_last[0] = PS + 1
    with pytest.raises(ValueError, match=r"last_page_len\[0\]"):
        _paged.check_kv_csr(indptr, indices, bad_last, PS, None, CUDA0, names=("indptr", "indices",
                                                                               "last_page_len"), host_ok=True)


def test_wrappers_name_a_table_on_another_device():
    (indptr, indices, last), _ = _table([5, 9])
    qo = torch.tensor([0, 2, 5], dtype=torch.int32)
    decode = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws(), "NHD")
    with pytest.raises(ValueError, match="last_page_len must be on the host"):
        decode.plan(indptr, indices, last.to("meta"), HQ, HK, D, PS, q_data_type=torch.float32)
    with pytest.raises(ValueError, match="last_page_len must be on the host"):
        decode.workspace_size(indptr, indices, last.to("meta"), HQ, HK, D, PS, q_data_type=torch.float32)
    paged = pagoda.BatchPrefillWithPagedKVCacheWrapper(_ws(), "NHD")
    with pytest.raises(ValueError, match="qo_indptr must be on the host"):
        paged.plan(qo.to("meta"), indptr, indices, last, HQ, HK, D, PS, q_data_type=torch.float32)
    with pytest.raises(ValueError, match="paged_kv_indices must be on the host"):
        paged.plan(qo, indptr, indices.to("meta"), last, HQ, HK, D, PS, q_data_type=torch.float32)
    ragged = pagoda.BatchPrefillWithRaggedKVCacheWrapper(_ws(), "NHD")
    with pytest.raises(ValueError, match="kv_indptr must be on the host"):
        ragged.plan(qo, qo.to("meta"), HQ, HK, D, q_data_type=torch.float32)


def _attend64(q, keys, vals):
    outs = []
    for b, (k, v) in enumerate(zip(keys, vals, strict=True)):
        kk = k.double().repeat_interleave(HQ // HK, 1)
        vv = v.double().repeat_interleave(HQ // HK, 1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), kk) / math.sqrt(D)
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), vv))
    return torch.stack(outs)


@pytest.mark.parametrize("graph_wrapper_class", [False, True])
def test_cuda_graph_decode_replans_from_host_tables(path, graph_wrapper_class):
    """FlashInfer's CUDA-graph decode test on the CPU: a warm-up plan of one full page per request, re-plans of
    ``i`` pages per request, then the real table; each plan copies the host tables into the buffers, and `run`
    equals the non-graph wrapper's and the float64 oracle."""
    batch, max_pages = 3, 12
    bufs = (torch.empty(batch + 1, dtype=torch.int32), torch.empty(max_pages, dtype=torch.int32),
            torch.empty(batch, dtype=torch.int32))
    if graph_wrapper_class:
        w = pagoda.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(_ws(), *bufs, "NHD")
    else:
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws(), "NHD", use_cuda_graph=True,
                                                      paged_kv_indptr_buffer=bufs[0],
                                                      paged_kv_indices_buffer=bufs[1],
                                                      paged_kv_last_page_len_buffer=bufs[2])
    plain = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws(), "NHD")
    cache = empty_cache(max_pages, PS, HK, D, "NHD", torch.float32)
    cache.normal_()
    per_seq = max_pages // batch
    tables = [(torch.arange(batch + 1, dtype=torch.int32), torch.arange(batch, dtype=torch.int32),
               torch.full((batch,), PS, dtype=torch.int32))]
    tables += [(torch.arange(batch + 1).int() * i, torch.arange(i * batch).int(),
                torch.full((batch,), PS, dtype=torch.int32)) for i in range(1, per_seq)]
    tables.append((torch.arange(batch + 1).int() * per_seq, torch.arange(max_pages).int(),
                   torch.full((batch,), 3, dtype=torch.int32)))
    q = torch.randn(batch, HQ, D)
    for indptr, indices, last in tables:
        w.plan(indptr, indices, last, HQ, HK, D, PS, q_data_type=torch.float32)
        assert torch.equal(bufs[0], indptr) and torch.equal(bufs[2], last)
        assert torch.equal(bufs[1][:indices.shape[0]], indices)
        plain.plan(indptr, indices, last, HQ, HK, D, PS, q_data_type=torch.float32)
        out = w.run(q, cache)
        torch.testing.assert_close(out, plain.run(q, cache), atol=1e-5, rtol=1e-5)
        keys, vals = [], []
        for b in range(batch):
            pages = indices[indptr[b]:indptr[b + 1]].long()
            n = (pages.numel() - 1) * PS + int(last[b])
            keys.append(cache[pages, 0].reshape(-1, HK, D)[:n])
            vals.append(cache[pages, 1].reshape(-1, HK, D)[:n])
        torch.testing.assert_close(out.double(), _attend64(q, keys, vals), atol=1e-5, rtol=1e-5)


def test_prefill_wrappers_plan_from_host_tables_in_graph_mode(path):
    lens, qo_lens = [9, 14], [3, 5]
    (indptr, indices, last), max_pages = _table(lens)
    qo = torch.tensor([0, 3, 8], dtype=torch.int32)
    cache = empty_cache(max_pages, PS, HK, D, "NHD", torch.float32)
    keys = [torch.randn(n, HK, D) for n in lens]
    vals = [torch.randn(n, HK, D) for n in lens]
    fill_cache(cache, keys, vals, indptr, indices, PS, "NHD")
    q = torch.randn(sum(qo_lens), HQ, D)
    bufs = (torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32),
            torch.zeros(max_pages, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
    graph = pagoda.BatchPrefillWithPagedKVCacheWrapper(_ws(), "NHD", use_cuda_graph=True, qo_indptr_buf=bufs[0],
                                                       paged_kv_indptr_buf=bufs[1], paged_kv_indices_buf=bufs[2],
                                                       paged_kv_last_page_len_buf=bufs[3])
    plain = pagoda.BatchPrefillWithPagedKVCacheWrapper(_ws(), "NHD")
    for w in (graph, plain):
        w.plan(qo, indptr, indices, last, HQ, HK, D, PS, causal=True, q_data_type=torch.float32)
    torch.testing.assert_close(graph.run(q, cache), plain.run(q, cache), atol=1e-5, rtol=1e-5)
    assert torch.equal(bufs[0], qo) and torch.equal(bufs[1], indptr) and torch.equal(bufs[3], last)

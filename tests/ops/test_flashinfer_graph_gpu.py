"""On a GPU: the table RoPE kernel against a float64 oracle (vLLM's shapes, bf16), a CUDA graph captured on
`CUDAGraphBatchDecodeWithPagedKVCacheWrapper` replayed after `fast_decode_plan` re-plans (the caller writing the
buffers, as SGLang does), and `workspace_size` with an exact buffer."""
import math

import pytest
import torch

import pagoda
from tests.helpers import rel_err
from tests.paged_utils import empty_cache, fill_cache, random_page_table

pytestmark = pytest.mark.gpu


def _attend64(q, keys, vals):
    outs = []
    for b, (k, v) in enumerate(zip(keys, vals, strict=True)):
        g = q.shape[1] // k.shape[1]
        s = torch.einsum("hd,nhd->hn", q[b].double(), k.double().repeat_interleave(g, 1)) / math.sqrt(q.shape[-1])
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v.double().repeat_interleave(g, 1)))
    return torch.stack(outs)


def test_cos_sin_cache_bf16_on_gpu():
    nnz, hq, hk, d, rd, max_pos = 257, 32, 8, 128, 64, 4096
    inv = 1.0 / 1e4 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv
    cache = torch.cat([ang.cos(), ang.sin()], -1).float().cuda()
    pos = torch.randint(0, max_pos, (nnz,), device="cuda")
    q = torch.randn(nnz, hq * d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(nnz, hk * d, dtype=torch.bfloat16, device="cuda")
    qo, _ = pagoda.apply_rope_with_cos_sin_cache(pos, q, k, d, cache, True)
    x = q.view(nnz, hq, d).double().cpu()
    a = ang[pos.cpu()][:, None, :]
    x1, x2 = x[..., :rd // 2], x[..., rd // 2:rd]
    want = torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin(), x[..., rd:]], -1)
    assert rel_err(qo.view(nnz, hq, d).cpu(), want) < 1e-2
    pagoda.apply_rope_with_cos_sin_cache_inplace(pos, q, k, d, cache, True)
    assert torch.equal(q, qo)


def test_graph_replay_after_fast_decode_plan():
    hq, hk, d, ps, batch = 32, 8, 128, 16, 4
    bufs = (torch.zeros(batch + 1, dtype=torch.int32, device="cuda"),
            torch.zeros(2048, dtype=torch.int32, device="cuda"),
            torch.zeros(batch, dtype=torch.int32, device="cuda"))
    w = pagoda.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"),
                                                           *bufs, "NHD")
    max_pages = 2048
    cache = empty_cache(max_pages, ps, hk, d, "NHD", torch.bfloat16, device="cuda")
    q_static = torch.zeros(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    for step, lens in enumerate(([7, 300, 4000, 1], [5000, 2, 17, 900])):
        indptr, indices, last, _ = random_page_table(lens, ps, extra_pages=max_pages - sum(-(-n // ps) for n in lens))
        keys = [torch.randn(n, hk, d, dtype=torch.bfloat16, device="cuda") for n in lens]
        vals = [torch.randn(n, hk, d, dtype=torch.bfloat16, device="cuda") for n in lens]
        fill_cache(cache, keys, vals, indptr, indices, ps, "NHD")
        if step == 0:
            w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16)
            w.run(q_static, cache)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_static = w.run(q_static, cache)
        else:
            bufs[0].copy_(indptr)
            bufs[1][:indices.shape[0]].copy_(indices)
            bufs[2].copy_(last)
            pagoda.fast_decode_plan(w, bufs[0], bufs[1][:indices.shape[0]], bufs[2], hq, hk, d, ps,
                                    q_data_type=torch.bfloat16, global_override_indptr_cpu=indptr.cpu())
        q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
        q_static.copy_(q)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out_static.cpu(), _attend64(q.cpu(), [k.cpu() for k in keys], [v.cpu() for v in vals])) < 1e-2


def test_decode_workspace_size_exact_buffer_on_gpu():
    hq, hk, d, ps, lens = 16, 4, 128, 16, [4096] * 4
    indptr, indices, last, max_pages = random_page_table(lens, ps, device="cuda")
    cache = empty_cache(max_pages, ps, hk, d, "NHD", torch.float16, device="cuda")
    keys = [torch.randn(n, hk, d, dtype=torch.float16, device="cuda") for n in lens]
    vals = [torch.randn(n, hk, d, dtype=torch.float16, device="cuda") for n in lens]
    fill_cache(cache, keys, vals, indptr, indices, ps, "NHD")
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(32 << 20, dtype=torch.uint8, device="cuda"))
    fl, it = w.workspace_size(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.float16)
    assert fl > 0 and it > 0
    w.reset_workspace_buffer(torch.empty(fl, dtype=torch.uint8, device="cuda"),
                             torch.empty(it, dtype=torch.uint8, device="cuda"))
    w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.float16)
    assert w._splits * len(lens) * hq * (d + 1) * 4 == fl
    q = torch.randn(len(lens), hq, d, dtype=torch.float16, device="cuda")
    assert rel_err(w.run(q, cache).cpu(), _attend64(q.cpu(), [k.cpu() for k in keys], [v.cpu() for v in vals])) < 5e-3


def test_graph_decode_plans_from_host_and_mixed_tables():
    """FlashInfer's CUDA-graph decode test: the warm-up plan gets indptr/indices on the GPU and last_page_len on the
    host, the re-plans between replays get host tables; each plan copies them into the wrapper's buffers."""
    hq, hk, d, ps, batch, per_seq = 32, 4, 128, 16, 4, 8
    pages = batch * per_seq
    bufs = (torch.empty(batch + 1, dtype=torch.int32, device="cuda"),
            torch.empty(pages, dtype=torch.int32, device="cuda"),
            torch.empty(batch, dtype=torch.int32, device="cuda"))
    w = pagoda.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.int8, device="cuda"),
                                                           *bufs, "NHD")
    cache = torch.randn(pages, 2, ps, hk, d, dtype=torch.float16, device="cuda")
    q = torch.randn(batch, hq, d, dtype=torch.float16, device="cuda")
    w.plan(torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
           torch.arange(batch, dtype=torch.int32, device="cuda"), torch.full((batch,), ps, dtype=torch.int32),
           hq, hk, d, ps, data_type=torch.float16, q_data_type=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            w.run(q, cache)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w.run(q, cache)
    for i in (*range(1, 4), per_seq):
        last_len = ps if i < per_seq else 5
        indptr, indices = torch.arange(batch + 1).int() * i, torch.arange(i * batch).int()
        last = torch.full((batch,), last_len, dtype=torch.int32)
        w.plan(indptr, indices, last, hq, hk, d, ps, data_type=torch.float16, q_data_type=torch.float16)
        graph.replay()
        torch.cuda.synchronize()
        c = cache.cpu()
        keys = [c[b * i:(b + 1) * i, 0].reshape(-1, hk, d)[:(i - 1) * ps + last_len] for b in range(batch)]
        vals = [c[b * i:(b + 1) * i, 1].reshape(-1, hk, d)[:(i - 1) * ps + last_len] for b in range(batch)]
        assert rel_err(out.cpu(), _attend64(q.cpu(), keys, vals)) < 5e-3


def test_wrappers_plan_from_host_and_mixed_tables_on_gpu():
    """Non-graph decode and both prefill wrappers: any mix of host and GPU tables plans as the all-GPU one."""
    hq, hk, d, ps, lens, qo_lens = 8, 2, 64, 16, [37, 100, 5], [3, 7, 1]
    indptr, indices, last, max_pages = random_page_table(lens, ps, device="cuda")
    cache = empty_cache(max_pages, ps, hk, d, "NHD", torch.float16, device="cuda")
    keys = [torch.randn(n, hk, d, dtype=torch.float16, device="cuda") for n in lens]
    vals = [torch.randn(n, hk, d, dtype=torch.float16, device="cuda") for n in lens]
    fill_cache(cache, keys, vals, indptr, indices, ps, "NHD")
    qo = torch.tensor([0, 3, 10, 11], dtype=torch.int32, device="cuda")
    kv_indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    k_rag, v_rag = torch.cat(keys), torch.cat(vals)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    qd = torch.randn(len(lens), hq, d, dtype=torch.float16, device="cuda")
    qp = torch.randn(sum(qo_lens), hq, d, dtype=torch.float16, device="cuda")
    results = {}
    for mix in ("cuda", "cpu", "mixed"):
        def put(t, i, mix=mix):
            return t.cpu() if mix == "cpu" or (mix == "mixed" and i % 2) else t
        dec = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        dec.plan(put(indptr, 0), put(indices, 1), put(last, 2), hq, hk, d, ps, q_data_type=torch.float16)
        paged = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        paged.plan(put(qo, 1), put(indptr, 0), put(indices, 1), put(last, 0), hq, hk, d, ps, causal=True,
                   q_data_type=torch.float16)
        ragged = pagoda.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
        ragged.plan(put(qo, 0), put(kv_indptr, 1), hq, hk, d, causal=True, q_data_type=torch.float16)
        results[mix] = (dec.run(qd, cache), paged.run(qp, cache), ragged.run(qp, k_rag, v_rag))
    for mix in ("cpu", "mixed"):
        for got, want in zip(results[mix], results["cuda"], strict=True):
            assert torch.equal(got, want)
    assert rel_err(results["cuda"][0].cpu(), _attend64(qd.cpu(), [k.cpu() for k in keys],
                                                       [v.cpu() for v in vals])) < 5e-3

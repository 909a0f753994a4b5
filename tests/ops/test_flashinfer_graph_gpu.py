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

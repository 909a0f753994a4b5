"""Multi-token decode rows (``q_len_per_req > 1``, speculative verification) in BatchDecodeWithPagedKVCacheWrapper:
against a float64 causal oracle on the contiguous keys (CPU path, the interpreter), FlashInfer's errors, and
CUDA-graph replays after re-plans under @gpu."""
import math
import os

import pytest
import torch

import pagoda
from pagoda.reference.attention import attention_ref
from tests.helpers import assert_finite_lse_close, rel_err
from tests.paged_utils import empty_cache, fill_cache, random_page_table

LOG2E = 1.0 / math.log(2.0)


def _setup(kv, n, hq=8, hk=2, d=32, page_size=16, dtype=torch.float32, device="cpu", layout="NHD"):
    indptr, indices, last, max_pages = random_page_table(kv, page_size, device=device)
    cache = empty_cache(max_pages, page_size, hk, d, layout, dtype, device=device)
    keys = [torch.randn(L, hk, d, dtype=dtype, device=device) for L in kv]
    vals = [torch.randn(L, hk, d, dtype=dtype, device=device) for L in kv]
    fill_cache(cache, keys, vals, indptr.cpu(), indices.cpu(), page_size, layout)
    q = torch.randn(len(kv) * n, hq, d, dtype=dtype, device=device)
    return q, cache, keys, vals, (indptr, indices, last)


def _oracle(q, keys, vals, n):
    """Each request's n tokens are its last n keys, causal among themselves (bottom-right alignment)."""
    outs, lses = [], []
    for b, (k, v) in enumerate(zip(keys, vals)):
        o, l = attention_ref(q[b * n:(b + 1) * n].double().cpu(), k.double().cpu(), v.double().cpu(),
                             softmax_scale=q.shape[-1] ** -0.5, window_right=0, compute_dtype=torch.float64)
        outs.append(o)
        lses.append(l.t())
    return torch.cat(outs), torch.cat(lses) * LOG2E


def _wrapper(device="cpu", **kw):
    return pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(1 << 22, dtype=torch.uint8, device=device), "NHD",
                                                     use_tensor_cores=True, **kw)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("kernel", [False, True])
def test_multi_token_decode_matches_causal_oracle(n, kernel, monkeypatch):
    if kernel and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the Triton kernel in the interpreter (TRITON_INTERPRET=1)")
    if kernel:
        from pagoda import _switches
        monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    kv = [n, 17, 64, 100]
    q, cache, keys, vals, meta = _setup(kv, n, dtype=torch.float16 if kernel else torch.float32)
    w = _wrapper()
    w.plan(*meta, 8, 2, 32, 16, q_data_type=q.dtype, q_len_per_req=n)
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = _oracle(q, keys, vals, n)
    tol = 2e-3 if kernel else 1e-6
    assert rel_err(out, want) < tol
    assert_finite_lse_close(lse, want_lse.float(), atol=5 * tol)
    # A re-plan back to one token per request is the ordinary decode.
    w.plan(*meta, 8, 2, 32, 16, q_data_type=q.dtype)
    o1 = w.run(q[n - 1::n].contiguous(), cache)
    assert rel_err(o1, want[n - 1::n]) < tol


def test_multi_token_decode_errors_follow_flashinfer():
    q, cache, _, _, meta = _setup([16, 16, 16, 16], 2)
    w = _wrapper()
    w.plan(*meta, 8, 2, 32, 16, q_data_type=torch.float32, q_len_per_req=2)
    with pytest.raises(ValueError, match="q_len_per_req"):
        w.run(torch.randn(12, 8, 32), cache)
    cuda_core = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8), "NHD")
    with pytest.raises(ValueError, match="use_tensor_cores"):
        cuda_core.plan(*meta, 8, 2, 32, 16, q_data_type=torch.float32, q_len_per_req=2)
    fa3 = _wrapper(backend="fa3")
    with pytest.raises(NotImplementedError, match="fa2"):
        fa3.plan(*meta, 8, 2, 32, 16, q_data_type=torch.float32, q_len_per_req=2)
    fa3.plan(*meta, 8, 2, 32, 16, q_data_type=torch.float32)     # one token per request: any backend
    with pytest.raises(ValueError, match=">= 1"):
        w.plan(*meta, 8, 2, 32, 16, q_len_per_req=0)
    indptr, indices, _ = meta
    with pytest.raises(ValueError, match="empty KV range"):
        _wrapper().plan(indptr, indices, torch.ones(4, dtype=torch.int32), 8, 2, 32, 16, q_len_per_req=2)
    bufs = dict(paged_kv_indptr_buffer=torch.zeros(5, dtype=torch.int32),
                paged_kv_indices_buffer=torch.zeros(8, dtype=torch.int32),
                paged_kv_last_page_len_buffer=torch.zeros(4, dtype=torch.int32))
    g = _wrapper(use_cuda_graph=True, **bufs)
    g.plan(*meta, 8, 2, 32, 16, q_data_type=torch.float32, q_len_per_req=2)
    g.plan(*meta, 8, 2, 32, 16, q_data_type=torch.float32, q_len_per_req=2)   # the same value re-plans
    with pytest.raises(ValueError, match="frozen"):
        g.plan(*meta, 8, 2, 32, 16, q_data_type=torch.float32, q_len_per_req=3)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("hk,group", [(2, 4), (8, 8)])
def test_gpu_multi_token_decode_cuda_graph_replays_after_replan(n, hk, group):
    batch, page_size, d, hq = 8, 16, 128, hk * group
    dtype = torch.bfloat16
    capture = [129] * batch
    replans = [[[33, 17, 65, 129][i % 4] for i in range(batch)], [[n, 128, 64, 100][i % 4] for i in range(batch)]]
    q, cache, _, _, meta = _setup(capture, n, hq, hk, d, page_size, dtype, "cuda")
    pages = cache.shape[0]
    w = _wrapper("cuda", use_cuda_graph=True,
                 paged_kv_indptr_buffer=torch.empty(batch + 1, dtype=torch.int32, device="cuda"),
                 paged_kv_indices_buffer=torch.empty(pages, dtype=torch.int32, device="cuda"),
                 paged_kv_last_page_len_buffer=torch.empty(batch, dtype=torch.int32, device="cuda"))

    def plan(m):
        w.plan(*m, hq, hk, d, page_size, q_data_type=dtype, q_len_per_req=n)

    def oracle(kv_lens, m):
        indptr, indices, last = (t.cpu() for t in m)
        from pagoda.reference.page import gather_paged_kv
        kv = gather_paged_kv((cache[:, 0].cpu(), cache[:, 1].cpu()), indptr, indices, last, "NHD")
        return _oracle(q, [k for k, _ in kv], [v for _, v in kv], n)[0]

    plan(meta)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            out = w.run(q, cache)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = w.run(q, cache, out=out)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out.cpu(), oracle(capture, meta)) < 1e-2
    for kv in replans:
        # New lengths over the same pages (a shorter request keeps a prefix of its pages).
        indptr, indices, _ = meta
        per = [-(-L // page_size) for L in kv]
        idx = torch.cat([indices[int(indptr[b]):int(indptr[b]) + per[b]] for b in range(batch)])
        new_indptr = torch.tensor([0] + torch.tensor(per).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        new_last = torch.tensor([(L - 1) % page_size + 1 for L in kv], dtype=torch.int32, device="cuda")
        m = (new_indptr, idx.to(torch.int32), new_last)
        plan(m)
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out.cpu(), oracle(kv, m)) < 1e-2

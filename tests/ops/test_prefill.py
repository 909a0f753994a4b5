"""Batch prefill wrappers (paged and ragged) and single prefill: against flash_attn_varlen_func on the same
data laid out contiguously (CPU path here; the Triton kernels under @gpu), options, validation, graphs."""
import math
import os

import pytest
import torch

import pagoda
from pagoda import _switches
from pagoda.ops import prefill as pf
from pagoda.reference import decode as dref
from pagoda.reference import prefill as ref
from tests.helpers import assert_finite_lse_close, rel_err
from tests.paged_utils import indptr_of, paged_inputs

LOG2E = 1.0 / math.log(2.0)   # the FlashInfer API's LSEs are base 2; the oracles' natural log

KV = [0, 1, 300, 17, 64, 129, 9]
QO = [0, 1, 300, 5, 1, 64, 9]


def _data(kv, qo, page_size, hq, hk, d, layout, dtype, device="cpu"):
    """`paged_inputs` with the keys and values of all requests concatenated ``[sum(kv), hk, d]``."""
    q, cache, keys, vals, meta = paged_inputs(kv, qo, page_size, hq, hk, d, layout, dtype, device)
    return q, cache, torch.cat(keys), torch.cat(vals), meta


def _varlen(q, k, v, qo, kv, causal, **kw):
    """The independent oracle: pagoda.flash_attn_varlen_func on contiguous ragged k/v."""
    o, l, _ = pagoda.flash_attn_varlen_func(q, k, v, indptr_of(qo, q.device), indptr_of(kv, q.device), max(qo), max(kv),
                                            causal=causal, return_attn_probs=True, **kw)
    return o, l.t()


def _ws(device="cpu"):
    return torch.empty(1 << 20, dtype=torch.uint8, device=device)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 7, 16, 64])
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2), (16, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_paged_prefill_matches_varlen(layout, page_size, hq, hk, causal):
    d = 64
    q, cache, k, v, meta = _data(KV, QO, page_size, hq, hk, d, layout, torch.float32)
    w = pf.BatchPrefillWithPagedKVCacheWrapper(_ws(), layout)
    w.plan(indptr_of(QO), *meta, hq, hk, d, page_size, causal=causal, q_data_type=torch.float32)
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = _varlen(q, k, v, QO, KV, causal)
    assert out.shape == q.shape and lse.shape == (q.shape[0], hq)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse * LOG2E, atol=1e-4)


@pytest.mark.parametrize("d", [128, 256])
def test_cpu_paged_prefill_head_dims_and_options(d):
    q, cache, k, v, meta = _data(KV, QO, 16, 8, 2, d, "NHD", torch.float32)
    w = pf.BatchPrefillWithPagedKVCacheWrapper(_ws(), "NHD")
    w.plan(indptr_of(QO), *meta, 8, 2, d, 16, causal=True, window_left=20, logits_soft_cap=4.0, sm_scale=0.1,
           q_data_type=torch.float32)
    want, want_lse = _varlen(q, k, v, QO, KV, True, window_size=(20, -1), softcap=4.0, softmax_scale=0.1)
    out, lse = w.run(q, cache, return_lse=True)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse * LOG2E, atol=1e-4)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("mode", ["NONE", "ALIBI", "ROPE_LLAMA"])
def test_cpu_ragged_wrapper_matches_paged_reference(layout, mode):
    q, cache, k, v, meta = _data(KV, QO, 5, 8, 2, 64, "NHD", torch.float32)
    w = pf.BatchPrefillWithRaggedKVCacheWrapper(_ws(), layout)
    w.plan(indptr_of(QO), indptr_of(KV), 8, 2, 64, causal=True, pos_encoding_mode=mode, rope_theta=5e5,
           q_data_type="float32")
    kk, vv = (k, v) if layout == "NHD" else (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
    out, lse = w.run(q, kk, vv, return_lse=True)
    want, want_lse = ref.batch_prefill_with_paged_kv_cache(q, cache.nan_to_num(), indptr_of(QO), *meta, "NHD",
                                                           causal=True, sm_scale=0.125, pos_encoding_mode=mode,
                                                           rope_theta=5e5)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse * LOG2E, atol=1e-4)


def test_cpu_single_prefill_and_alibi_equals_flash_attn():
    q, k, v = torch.randn(30, 8, 64), torch.randn(50, 2, 64), torch.randn(50, 2, 64)
    out, lse = pf.single_prefill_with_kv_cache(q, k, v, causal=True, pos_encoding_mode="ALIBI", return_lse=True)
    o, l, _ = pagoda.flash_attn_func(q[None], k[None], v[None], causal=True, alibi_slopes=dref.alibi_slopes(8),
                                     return_attn_probs=True)
    assert rel_err(out, o[0]) < 1e-5
    assert_finite_lse_close(lse, l[0].t() * LOG2E, atol=1e-4)
    hnd = pf.single_prefill_with_kv_cache(q, k.transpose(0, 1), v.transpose(0, 1), causal=True, kv_layout="HND",
                                          pos_encoding_mode="ALIBI")
    assert torch.equal(hnd, out)


def test_cpu_paged_graph_mode_pads_batch():
    hq, hk, d, ps = 4, 2, 64, 8
    bufs = dict(qo_indptr_buf=torch.zeros(5, dtype=torch.int32), paged_kv_indptr_buf=torch.zeros(5, dtype=torch.int32),
                paged_kv_indices_buf=torch.zeros(100, dtype=torch.int32),
                paged_kv_last_page_len_buf=torch.zeros(4, dtype=torch.int32))
    w = pf.BatchPrefillWithPagedKVCacheWrapper(_ws(), "NHD", use_cuda_graph=True, **bufs)
    q, cache, k, v, meta = _data([10, 30], [3, 30], ps, hq, hk, d, "NHD", torch.float32)
    w.plan(indptr_of([3, 30]), *meta, hq, hk, d, ps, causal=True, q_data_type=torch.float32)
    assert bufs["qo_indptr_buf"].tolist() == [0, 3, 33, 33, 33]
    assert bufs["paged_kv_last_page_len_buf"].tolist()[2:] == [0, 0]
    out = w.run(q, cache)
    assert rel_err(out, _varlen(q, k, v, [3, 30], [10, 30], True)[0]) < 1e-5


@pytest.mark.parametrize("kw,err,match", [
    (dict(num_qo_heads=5), ValueError, "num_qo_heads"),
    (dict(head_dim_qk=20), ValueError, "head_dim"),
    (dict(head_dim_vo=32), NotImplementedError, "head_dim_vo"),
    (dict(custom_mask=torch.ones(3, dtype=torch.bool)), ValueError, "custom_mask must hold"),
    (dict(causal=1), TypeError, "causal"),
    (dict(qo_indptr=torch.tensor([0, 5, 3], dtype=torch.int32)), ValueError, "qo_indptr"),
    (dict(qo_indptr=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "paged_kv_indptr"),
    (dict(qo_indptr=torch.tensor([0, 20, 30], dtype=torch.int32), causal=True), ValueError, "kv_len >= qo_len"),
    (dict(paged_kv_last_page_len=torch.tensor([0, 4], dtype=torch.int32)), ValueError, "paged_kv_last_page_len"),
    (dict(pos_encoding_mode="XPOS"), ValueError, "pos_encoding_mode"),
    (dict(window_left=-5), ValueError, "window_left"),
])
def test_paged_plan_validation(kw, err, match):
    _, _, _, _, (indptr, indices, last) = _data([10, 30], [3, 30], 8, 4, 2, 64, "NHD", torch.float32)
    args = dict(qo_indptr=indptr_of([3, 30]), paged_kv_indptr=indptr, paged_kv_indices=indices,
                paged_kv_last_page_len=last, num_qo_heads=4, num_kv_heads=2, head_dim_qk=64, page_size=8)
    args.update(kw)
    with pytest.raises(err, match=match):
        pf.BatchPrefillWithPagedKVCacheWrapper(_ws()).plan(**args)


def test_run_validation():
    q, cache, k, v, meta = _data([10, 30], [3, 30], 8, 4, 2, 64, "NHD", torch.float16)
    w = pf.BatchPrefillWithPagedKVCacheWrapper(_ws())
    with pytest.raises(RuntimeError, match="plan"):
        w.run(q, cache)
    w.plan(indptr_of([3, 30]), *meta, 4, 2, 64, 8)
    with pytest.raises(ValueError, match="q must have shape"):
        w.run(q[:5], cache)
    with pytest.raises(ValueError, match="num_kv_heads"):
        w.run(q, cache[..., :1, :])
    with pytest.raises(TypeError, match="paged_kv_cache"):
        w.run(q, cache.float())
    r = pf.BatchPrefillWithRaggedKVCacheWrapper(_ws())
    r.plan(indptr_of([3, 30]), indptr_of([10, 30]), 4, 2, 64)
    with pytest.raises(ValueError, match="k and v"):
        r.run(q, k[:5], v[:5])
    with pytest.raises(ValueError, match="kv_indptr"):
        r.plan(indptr_of([3, 30]), indptr_of([10]), 4, 2, 64)


# ------------------------------------------- the Triton kernel path in the interpreter (no CUDA)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
SPLIT_KV = [0, 1, 300, 17, 129, 9]        # empty, one key, several chunks, shorter than a chunk
SPLIT_QO = [0, 1, 12, 5, 1, 9]


@pytest.fixture
def kernel_path(monkeypatch):
    """Send CPU tensors to the Triton kernels (interpreter), pretend to have 64 SMs and allow 128-key chunks,
    so that small batches split their keys."""
    from pagoda.ops import _decode_plan, _prefill_split

    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: 64)
    monkeypatch.setattr(_prefill_split, "MIN_CHUNK", 128)
    monkeypatch.setattr(_prefill_split, "MIN_CHUNK_SMALL", 128)


def _ref_paged(q, cache, qo, meta, layout, causal, **kw):
    return ref.batch_prefill_with_paged_kv_cache(q, cache.nan_to_num(), indptr_of(qo), *meta, layout, causal=causal,
                                                 sm_scale=q.shape[-1] ** -0.5, compute_dtype=torch.float64, **kw)


def test_split_plan_heuristic():
    """Host-side choices (`pagoda.ops._prefill_split`) on the shapes that motivated them (132-SM H200)."""
    from pagoda.ops import _prefill_split as sp

    # Cascade shared level: 1 request, 128 queries x GQA 4 = 512 rows -> 4 tiles of 128 x 8 KV heads = 32
    # programs against 32768 keys: 8 splits of 4096 keys fill 2 programs per SM.
    n = sp.programs([128], 4, 8, 128)
    assert n == 32 and sp.choose(n, 32768, 132, 64, 128, 128) == (4096, 8)
    # Long prefill fills the GPU alone; short KV is not worth splitting; a tiny workspace forbids it.
    assert sp.choose(sp.programs([16384], 4, 8, 128), 16384, 132, 64, 128, 128) == (0, 0)
    assert sp.choose(32, 700, 132, 64, 128, 128) == (0, 0)
    assert sp.choose(32, 32768, 132, 1, 128, 128) == (0, 0)
    # Fixed chunk: rounded to the alignment, capped by the workspace.
    assert sp.choose(1000, 1000, 132, 64, 16, 128, fixed_chunk=100) == (128, 8)
    assert sp.choose(1000, 1000, 132, 4, 16, 128, fixed_chunk=100) == (256, 4)
    # Graph mode: the split count from the first plan, chunks that always cover the longest request.
    assert sp.graph_splits(32, 132, 128) == 8 and sp.graph_splits(300, 132, 128) == 0
    # One decode-like request (1 query x GQA 4 = 16-row tiles) on 8 KV heads: 4 programs per SM.
    assert sp.choose(8, 32768, 132, 64, 16, 128) == (512, 64) and sp.graph_splits(8, 132, 16) == 64
    assert sp.graph_chunk(0, 8, 128) == 128 and sp.graph_chunk(5000, 8, 128) == 640
    assert sp.graph_chunk(100, 8, 128, fixed_chunk=300) == 384


def test_launch_config_classes():
    pp = pytest.importorskip("pagoda.kernels.attention.prefill_paged")
    assert [pp.choose_block_m(r, 128) for r in (1, 16, 17, 64, 65)] == [16, 16, 64, 64, 128]
    assert pp.choose_block_m(4096, 256) == 64 and pp.choose_block_m(4096, 128, fp32=True) == 64
    configs = pp._prefill_paged_tuned.configs
    for d, bm, fp32 in ((128, 128, False), (64, 16, False), (256, 64, False), (128, 64, True), (128, 16, True)):
        kept = pp._prune(configs, {}, HEAD_DIM_PAD=d, BLOCK_M=bm, IEEE=fp32)
        assert kept and all(pp.SPLIT_ALIGN % c.kwargs["BLOCK_N"] == 0 for c in kept)
        if not fp32 and d <= 128:
            assert {(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == set(pp._TILES[bm])
    assert pp.addr_flags(16, (4096, 256, 32), (4096, 256, 32)) == 3
    assert pp.addr_flags(5, (4096, 256, 32), (8192, 512, 32)) == 0
    assert pp.addr_flags(1 << 20, (0, 4096, 128), (0, 4096, 128)) == 7


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (TRITON_INTERPRET=1, no CUDA)")
@pytest.mark.parametrize("page_size,hq,hk,layout", [(1, 4, 4, "NHD"), (16, 8, 2, "HND"), (7, 8, 1, "NHD")])
@pytest.mark.parametrize("causal,window_left,fixed", [(True, -1, None), (False, -1, None), (True, 40, None),
                                                      (True, -1, 9)])
def test_kernel_path_split_kv(kernel_path, page_size, hq, hk, layout, causal, window_left, fixed):
    d = 16
    q, cache, _, _, meta = _data(SPLIT_KV, SPLIT_QO, page_size, hq, hk, d, layout, torch.float32)
    w = pf.BatchPrefillWithPagedKVCacheWrapper(_ws(), layout)
    w.plan(indptr_of(SPLIT_QO), *meta, hq, hk, d, page_size, causal=causal, window_left=window_left,
           q_data_type=torch.float32, fixed_split_size=fixed)
    assert w._splits >= 2
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = _ref_paged(q, cache, SPLIT_QO, meta, layout, causal, window_left=window_left)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float() * LOG2E, atol=1e-4)


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (TRITON_INTERPRET=1, no CUDA)")
@pytest.mark.parametrize("ws_bytes,disable,splits", [(1 << 20, True, 0), (64, False, 0), (1 << 20, False, 2)])
def test_kernel_path_split_fallbacks(kernel_path, ws_bytes, disable, splits):
    """disable_split_kv and a workspace too small for the partial states run unsplit; padded q rows stay zero."""
    q, cache, _, _, meta = _data([300, 20], [6, 2], 16, 8, 2, 16, "NHD", torch.float16)
    w = pf.BatchPrefillWithPagedKVCacheWrapper(torch.empty(ws_bytes, dtype=torch.uint8), "NHD")
    w.plan(indptr_of([6, 2]), *meta, 8, 2, 16, 16, causal=True, q_data_type=torch.float16, disable_split_kv=disable)
    assert w._splits == splits
    qp = torch.cat([q, torch.randn(3, 8, 16, dtype=q.dtype)])
    out, lse = w.run(qp, cache, return_lse=True)
    want, want_lse = _ref_paged(q, cache, [6, 2], meta, "NHD", True)
    assert rel_err(out[:8], want) < 2e-3
    assert_finite_lse_close(lse[:8], want_lse.float() * LOG2E, atol=2e-3)
    assert (out[8:] == 0).all() and torch.isneginf(lse[8:]).all()


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (TRITON_INTERPRET=1, no CUDA)")
def test_kernel_path_graph_mode_split_replans(kernel_path):
    """CUDA-graph mode: BLOCK_M and the split count fixed by the first plan, the chunk rewritten in place by
    later plans (a smaller batch with a longer request); rows past qo_indptr[-1] zero."""
    hq, hk, d, ps, nb = 8, 2, 16, 16, 4
    bufs = dict(qo_indptr_buf=torch.zeros(nb + 1, dtype=torch.int32),
                paged_kv_indptr_buf=torch.zeros(nb + 1, dtype=torch.int32),
                paged_kv_indices_buf=torch.zeros(64, dtype=torch.int32),
                paged_kv_last_page_len_buf=torch.zeros(nb, dtype=torch.int32))
    w = pf.BatchPrefillWithPagedKVCacheWrapper(_ws(), "NHD", use_cuda_graph=True, **bufs)
    q_static = torch.zeros(24, hq, d)
    chunk_buf = w._chunk_buf
    for kv, qo in (([200, 40, 9], [4, 3, 9]), ([700], [5]), ([0, 3], [0, 1])):
        q, cache, _, _, meta = _data(kv, qo, ps, hq, hk, d, "NHD", torch.float32)
        w.plan(indptr_of(qo), *meta, hq, hk, d, ps, causal=True, q_data_type=torch.float32)
        assert w._splits >= 2 and w._chunk_buf is chunk_buf
        assert w._splits * int(chunk_buf) >= max(kv)
        q_static.normal_()
        q_static[:q.shape[0]].copy_(q)
        out, lse = w.run(q_static, cache, return_lse=True)
        want, want_lse = _ref_paged(q, cache, qo, meta, "NHD", True)
        n = q.shape[0]
        assert rel_err(out[:n], want) < 1e-5
        assert_finite_lse_close(lse[:n], want_lse.float() * LOG2E, atol=1e-4)
        assert (out[n:] == 0).all() and torch.isneginf(lse[n:]).all()


# ------------------------------------------------------------------------------------------- GPU

GPU_KV = [0, 1, 2048, 37, 513, 700, 16]
GPU_QO = [0, 1, 2048, 37, 1, 200, 16]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 7, 16, 64])
@pytest.mark.parametrize("hq,hk", [(8, 8), (32, 8), (32, 4)])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_paged_prefill_bf16(layout, page_size, hq, hk, d, causal):
    q, cache, k, v, meta = _data(GPU_KV, GPU_QO, page_size, hq, hk, d, layout, torch.bfloat16, "cuda")
    w = pf.BatchPrefillWithPagedKVCacheWrapper(_ws("cuda"), layout)
    w.plan(indptr_of(GPU_QO, "cuda"), *meta, hq, hk, d, page_size, causal=causal, q_data_type=torch.bfloat16)
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = _varlen(q, k, v, GPU_QO, GPU_KV, causal)
    assert rel_err(out, want) < 1e-2
    assert_finite_lse_close(lse, want_lse * LOG2E, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["NONE", "ALIBI", "ROPE_LLAMA"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_paged_prefill_options(mode, dtype):
    q, cache, _, _, meta = _data(GPU_KV, GPU_QO, 16, 8, 2, 128, "NHD", dtype, "cuda")
    w = pf.BatchPrefillWithPagedKVCacheWrapper(_ws("cuda"), "NHD")
    w.plan(indptr_of(GPU_QO, "cuda"), *meta, 8, 2, 128, 16, causal=True, pos_encoding_mode=mode, window_left=100,
           logits_soft_cap=30.0, q_data_type=dtype)
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = ref.batch_prefill_with_paged_kv_cache(
        q.cpu(), cache.cpu().nan_to_num(), indptr_of(GPU_QO), *(t.cpu() for t in meta), "NHD", causal=True,
        sm_scale=128 ** -0.5, window_left=100, logits_soft_cap=30.0, pos_encoding_mode=mode,
        compute_dtype=torch.float64)
    assert rel_err(out.cpu(), want) < (2e-3 if dtype == torch.float16 else 1e-4)
    assert_finite_lse_close(lse.cpu(), want_lse.float() * LOG2E, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["NONE", "ROPE_LLAMA"])
def test_cuda_ragged_and_single(mode):
    q, cache, k, v, meta = _data(GPU_KV, GPU_QO, 16, 32, 8, 128, "NHD", torch.bfloat16, "cuda")
    r = pf.BatchPrefillWithRaggedKVCacheWrapper(_ws("cuda"))
    r.plan(indptr_of(GPU_QO, "cuda"), indptr_of(GPU_KV, "cuda"), 32, 8, 128, causal=True, pos_encoding_mode=mode,
           q_data_type=torch.bfloat16)
    p = pf.BatchPrefillWithPagedKVCacheWrapper(_ws("cuda"))
    p.plan(indptr_of(GPU_QO, "cuda"), *meta, 32, 8, 128, 16, causal=True, pos_encoding_mode=mode,
           q_data_type=torch.bfloat16)
    assert rel_err(r.run(q, k, v), p.run(q, cache)) < 1e-2
    s = pf.single_prefill_with_kv_cache(q[1:2049], k[1:2049], v[1:2049], causal=True, pos_encoding_mode=mode)
    assert rel_err(s, p.run(q, cache)[1:2049]) < 1e-2


@pytest.mark.gpu
def test_cuda_paged_prefill_graph_replay():
    hq, hk, d, ps, nb = 8, 2, 128, 16, 4
    bufs = dict(qo_indptr_buf=torch.zeros(nb + 1, dtype=torch.int32, device="cuda"),
                paged_kv_indptr_buf=torch.zeros(nb + 1, dtype=torch.int32, device="cuda"),
                paged_kv_indices_buf=torch.zeros(512, dtype=torch.int32, device="cuda"),
                paged_kv_last_page_len_buf=torch.zeros(nb, dtype=torch.int32, device="cuda"))
    w = pf.BatchPrefillWithPagedKVCacheWrapper(_ws("cuda"), "NHD", use_cuda_graph=True, **bufs)
    q_static = torch.zeros(256, hq, d, dtype=torch.float16, device="cuda")
    q, cache0, _, _, meta = _data([300, 40, 1, 7], [100, 40, 1, 7], ps, hq, hk, d, "NHD", torch.float16, "cuda")
    # One static cache, large enough for every batch replayed below (the graph captures its address).
    cache = torch.zeros((128,) + tuple(cache0.shape[1:]), dtype=cache0.dtype, device="cuda")
    cache[:cache0.shape[0]].copy_(cache0)
    w.plan(indptr_of([100, 40, 1, 7], "cuda"), *meta, hq, hk, d, ps, causal=True, q_data_type=torch.float16)
    q_static[:148].copy_(q)
    w.run(q_static, cache)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = w.run(q_static, cache)
    for kv, qo in (([300, 40, 1, 7], [100, 40, 1, 7]), ([900], [250]), ([5, 5], [5, 1])):
        q, cache2, k, v, meta = _data(kv, qo, ps, hq, hk, d, "NHD", torch.float16, "cuda")
        assert cache2.shape[0] <= cache.shape[0]
        cache[:cache2.shape[0]].copy_(cache2)
        w.plan(indptr_of(qo, "cuda"), *meta, hq, hk, d, ps, causal=True, q_data_type=torch.float16)
        q_static.zero_()
        q_static[:q.shape[0]].copy_(q)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out_static[:q.shape[0]], _varlen(q, k, v, qo, kv, True)[0]) < 2e-3
        assert (out_static[q.shape[0]:] == 0).all()


@pytest.mark.gpu
def test_cuda_runs_do_not_sync():
    q, cache, k, v, meta = _data(GPU_KV, GPU_QO, 16, 32, 8, 128, "NHD", torch.bfloat16, "cuda")
    r = pf.BatchPrefillWithRaggedKVCacheWrapper(_ws("cuda"))
    r.plan(indptr_of(GPU_QO, "cuda"), indptr_of(GPU_KV, "cuda"), 32, 8, 128, causal=True, q_data_type=torch.bfloat16)
    p = pf.BatchPrefillWithPagedKVCacheWrapper(_ws("cuda"))
    p.plan(indptr_of(GPU_QO, "cuda"), *meta, 32, 8, 128, 16, causal=True, q_data_type=torch.bfloat16)
    want = r.run(q, k, v)  # compiles
    p.run(q, cache)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got_r, got_p = r.run(q, k, v), p.run(q, cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got_r, want) and rel_err(got_p, want) < 1e-2

"""The paged prefill kernel under TRITON_INTERPRET=1 on the CPU (fp16/fp32), against the reference."""
import os

import pytest
import torch

from pagoda.ops import _paged
from pagoda.reference import decode as dref
from pagoda.reference import prefill as ref
from tests.helpers import assert_finite_lse_close, rel_err
from tests.paged_utils import empty_cache, fill_cache, random_page_table

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="interpreter tests run only where TRITON_INTERPRET=1 (no CUDA)")

triton = pytest.importorskip("triton")
from pagoda.kernels.attention.prefill_paged import prefill_paged_fwd  # noqa: E402

KV = [0, 1, 37, 20, 5]
QO = [0, 1, 10, 20, 5]


def _run(page_size, layout, dtype, causal, hq=4, hk=2, d=32, mode="NONE", window_left=-1, soft_cap=0.0, kv=KV,
         qo=QO, block_m=16, block_n=16, chunk=0, num_splits=0, pad_rows=0):
    """Kernel vs float64 reference (ALiBi in FlashInfer's signed form, as the paged wrappers run it);
    ``chunk``/``num_splits`` > 0 runs split-KV (partials + merge); ``pad_rows``
    extra q rows past qo_indptr[-1] must be left untouched (NaN)."""
    indptr, indices, last, max_pages = random_page_table(kv, page_size)
    cache = empty_cache(max_pages, page_size, hk, d, layout, dtype)
    keys = [torch.randn(n, hk, d, dtype=dtype) for n in kv]
    values = [torch.randn(n, hk, d, dtype=dtype) for n in kv]
    fill_cache(cache, keys, values, indptr, indices, page_size, layout)
    qptr = torch.zeros(len(qo) + 1, dtype=torch.int32)
    qptr[1:] = torch.cumsum(torch.tensor(qo), 0)
    nnz = sum(qo)
    q = torch.randn(nnz + pad_rows, hq, d, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((nnz + pad_rows, hq), float("nan"))
    split = {}
    if num_splits:
        split = dict(num_splits=num_splits, chunk=torch.tensor([chunk], dtype=torch.int32),
                     o_part=torch.full((nnz, num_splits, hq, d), float("nan")),
                     lse_part=torch.full((nnz, num_splits, hq), float("nan")))
    kc, vc = cache[:, 0], cache[:, 1]
    prefill_paged_fwd(q, kc, vc, _paged.cache_strides(kc, layout), _paged.cache_strides(vc, layout), qptr, indptr,
                      indices, last, page_size, hk, max(qo), out, lse, sm_scale=d ** -0.5, causal=causal,
                      window_left=window_left, logits_soft_cap=soft_cap,
                      alibi_slopes=dref.alibi_slopes(hq) if mode == "ALIBI" else None,
                      rope=(1.0, 1e4) if mode == "ROPE_LLAMA" else None, alibi_signed=True,
                      config={"BLOCK_M": block_m, "BLOCK_N": block_n}, **split)
    if pad_rows:
        assert out[nnz:].isnan().all() and lse[nnz:].isnan().all(), "rows past qo_indptr[-1] were written"
        q, out, lse = q[:nnz], out[:nnz], lse[:nnz]
    want, want_lse = ref.batch_prefill_with_paged_kv_cache(
        q, cache.nan_to_num(), qptr, indptr, indices, last, layout, causal=causal, sm_scale=d ** -0.5,
        window_left=window_left, logits_soft_cap=soft_cap, pos_encoding_mode=mode, compute_dtype=torch.float64)
    return out, lse, want, want_lse


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 1)])
def test_prefill_paged_matches_reference(layout, page_size, causal, hq, hk):
    out, lse, want, want_lse = _run(page_size, layout, torch.float16, causal, hq, hk)
    assert not out.isnan().any() and not lse.isnan().any(), "output element left unwritten"
    assert rel_err(out, want) < 2e-3
    assert_finite_lse_close(lse, want_lse.float(), atol=2e-3)


@pytest.mark.parametrize("mode,window_left,soft_cap", [("ALIBI", -1, 0.0), ("ROPE_LLAMA", -1, 0.0), ("NONE", 6, 0.0),
                                                       ("NONE", 0, 0.0), ("NONE", -1, 3.0)])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_paged_options(mode, window_left, soft_cap, causal):
    out, lse, want, want_lse = _run(4, "NHD", torch.float32, causal, mode=mode, window_left=window_left,
                                    soft_cap=soft_cap)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


def test_rows_without_keys_when_queries_outnumber_keys():
    out, lse, want, want_lse = _run(3, "HND", torch.float32, True, kv=[4, 2], qo=[9, 2])
    assert torch.isneginf(lse[:5]).all() and (out[:5] == 0).all()
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@pytest.mark.parametrize("hq,hk,block_m", [(8, 2, 16), (8, 1, 16), (12, 4, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_packed_rows(hq, hk, block_m, causal):
    """Rows (query, head) packed per KV head: tiles that start and end inside a query's group of heads."""
    out, lse, want, want_lse = _run(5, "NHD", torch.float32, causal, hq, hk, block_m=block_m)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


SPLIT_KV = [0, 1, 37, 150, 5, 64]   # empty, one key, shorter than a chunk, many chunks, chunk-aligned
SPLIT_QO = [0, 1, 10, 12, 5, 3]


@pytest.mark.parametrize("page_size,hq,hk", [(1, 4, 4), (5, 8, 2), (16, 8, 1)])
@pytest.mark.parametrize("causal,window_left", [(False, -1), (True, -1), (True, 20), (False, 30)])
def test_split_kv_matches_reference(page_size, hq, hk, causal, window_left):
    chunk = 32
    splits = -(-max(SPLIT_KV) // chunk) + 1    # one more than needed: a chunk past every request's keys
    out, lse, want, want_lse = _run(page_size, "HND" if page_size == 5 else "NHD", torch.float32, causal, hq, hk,
                                    window_left=window_left, kv=SPLIT_KV, qo=SPLIT_QO, chunk=chunk,
                                    num_splits=splits, pad_rows=3)
    assert not out.isnan().any() and not lse.isnan().any(), "output element left unwritten"
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@pytest.mark.parametrize("mode,soft_cap", [("ALIBI", 0.0), ("ROPE_LLAMA", 0.0), ("NONE", 3.0)])
def test_split_kv_options_fp16(mode, soft_cap):
    out, lse, want, want_lse = _run(16, "NHD", torch.float16, True, 8, 2, mode=mode, soft_cap=soft_cap,
                                    kv=SPLIT_KV, qo=SPLIT_QO, block_m=32, chunk=48, num_splits=4)
    assert rel_err(out, want) < 2e-3
    assert_finite_lse_close(lse, want_lse.float(), atol=2e-3)


def test_split_kv_rows_without_keys():
    """Queries outnumbering keys (a cascade's last level): early rows see nothing in every chunk."""
    out, lse, want, want_lse = _run(3, "NHD", torch.float32, True, kv=[40, 2], qo=[45, 2], chunk=16, num_splits=3)
    assert torch.isneginf(lse[:5]).all() and (out[:5] == 0).all()
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@pytest.mark.parametrize("wide", [False, True])
def test_kv_caches_with_different_strides(monkeypatch, wide):
    """V in a wider buffer than K (its own page/token strides), and the 64-bit in-page offsets (forced)."""
    import pagoda.kernels.attention.prefill_paged as pp

    if wide:
        real = pp.addr_flags
        monkeypatch.setattr(pp, "addr_flags", lambda *a: real(*a) | 4)
    kv, ps, hq, hk, d = [37, 20], 4, 8, 2, 32   # queries: 10 and 20 (qptr)
    indptr, indices, last, max_pages = random_page_table(kv, ps)
    k_cache = torch.randn(max_pages, ps, hk, d)
    v_cache = torch.randn(max_pages, ps, hk + 1, d)[:, :, 1:]
    assert pp.addr_flags(ps, k_cache.stride()[:3], v_cache.stride()[:3]) & 2 == 0
    qptr = torch.tensor([0, 10, 30], dtype=torch.int32)
    q = torch.randn(30, hq, d)
    out, lse = torch.full_like(q, float("nan")), torch.full((30, hq), float("nan"))
    prefill_paged_fwd(q, k_cache, v_cache, k_cache.stride()[:3], v_cache.stride()[:3], qptr, indptr, indices, last, ps,
                      hk, 20, out, lse, sm_scale=d ** -0.5, causal=True, config={"BLOCK_M": 16, "BLOCK_N": 16})
    cache = torch.stack([k_cache, v_cache.contiguous()], 1)
    want, want_lse = ref.batch_prefill_with_paged_kv_cache(q, cache, qptr, indptr, indices, last, "NHD", causal=True,
                                                           sm_scale=d ** -0.5, compute_dtype=torch.float64)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@pytest.mark.parametrize("split", [False, True])
def test_head_dim_not_a_power_of_two(split):
    """head_dim 40 (padded to 64 in registers): masked d columns in the fully visible blocks too."""
    kw = dict(chunk=32, num_splits=5) if split else {}
    out, lse, want, want_lse = _run(16, "NHD", torch.float32, True, 8, 2, d=40, kv=SPLIT_KV, qo=SPLIT_QO, **kw)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


def _tile_pairs():
    from pagoda.kernels.attention.prefill_paged import _TILES
    return sorted({(bm, bn) for bm, tiles in _TILES.items() for bn, _, _ in tiles})


@pytest.mark.parametrize("block_m,block_n", _tile_pairs())
def test_every_autotuned_tile_shape_matches_reference(block_m, block_n):
    """The autotuner may pick any (BLOCK_M, BLOCK_N) of `_TILES`; each must be exact, with split-KV
    chunks of SPLIT_ALIGN keys as the tuned launch uses them."""
    from pagoda.kernels.attention.prefill_paged import SPLIT_ALIGN
    kv, qo = [0, 1, 37, 300, 5], [0, 1, 10, 7, 5]
    splits = -(-max(kv) // SPLIT_ALIGN)
    out, lse, want, want_lse = _run(16, "NHD", torch.float16, True, 8, 2, kv=kv, qo=qo, block_m=block_m,
                                    block_n=block_n, chunk=SPLIT_ALIGN, num_splits=splits)
    assert rel_err(out.float(), want) < 2e-3
    assert_finite_lse_close(lse, want_lse.float(), atol=2e-3)

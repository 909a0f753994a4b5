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
from pagoda.kernels.prefill_paged import prefill_paged_fwd  # noqa: E402

KV = [0, 1, 37, 20, 5]
QO = [0, 1, 10, 20, 5]


def _run(page_size, layout, dtype, causal, hq=4, hk=2, d=32, mode="NONE", window_left=-1, soft_cap=0.0, kv=KV,
         qo=QO):
    indptr, indices, last, max_pages = random_page_table(kv, page_size)
    cache = empty_cache(max_pages, page_size, hk, d, layout, dtype)
    fill_cache(cache, [torch.randn(n, hk, d, dtype=dtype) for n in kv], [torch.randn(n, hk, d, dtype=dtype) for n in kv],
               indptr, indices, page_size, layout)
    qptr = torch.zeros(len(qo) + 1, dtype=torch.int32)
    qptr[1:] = torch.cumsum(torch.tensor(qo), 0)
    q = torch.randn(sum(qo), hq, d, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((sum(qo), hq), float("nan"))
    kc, vc = cache[:, 0], cache[:, 1]
    prefill_paged_fwd(q, kc, vc, _paged.cache_strides(kc, layout), _paged.cache_strides(vc, layout), qptr, indptr,
                      indices, last, page_size, hk, max(qo), out, lse, sm_scale=d ** -0.5, causal=causal,
                      window_left=window_left, logits_soft_cap=soft_cap,
                      alibi_slopes=dref.alibi_slopes(hq) if mode == "ALIBI" else None,
                      rope=(1.0, 1e4) if mode == "ROPE_LLAMA" else None, config={"BLOCK_M": 16, "BLOCK_N": 16})
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

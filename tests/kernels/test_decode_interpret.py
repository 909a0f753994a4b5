"""The split-KV decode kernels under TRITON_INTERPRET=1 on the CPU (fp16/fp32), against the reference."""
import os

import pytest
import torch

from pagoda.ops import _paged
from pagoda.reference import decode as ref
from tests.helpers import assert_finite_lse_close, rel_err
from tests.paged_utils import empty_cache, fill_cache, random_page_table

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="interpreter tests run only where TRITON_INTERPRET=1 (no CUDA)")

triton = pytest.importorskip("triton")
from pagoda.kernels.attention.decode import decode_fwd  # noqa: E402


def _run(lens, page_size, hq, hk, d, layout, dtype, chunk=None, mode="NONE", window_left=-1, soft_cap=0.0,
         block_n=16, fused=False):
    indptr, indices, last, max_pages = random_page_table(lens, page_size)
    cache = empty_cache(max_pages, page_size, hk, d, layout, dtype)
    keys = [torch.randn(n, hk, d, dtype=dtype) for n in lens]
    vals = [torch.randn(n, hk, d, dtype=dtype) for n in lens]
    fill_cache(cache, keys, vals, indptr, indices, page_size, layout)
    q = torch.randn(len(lens), hq, d, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((len(lens), hq), float("nan"))
    splits = 0 if chunk is None else max(1, -(-max(lens) // chunk))
    o_part = torch.full((len(lens), splits, hq, d), float("nan"))
    lse_part = torch.full((len(lens), splits, hq), float("nan"))
    kc, vc = cache[:, 0], cache[:, 1]
    counters = torch.zeros(len(lens) * hk, dtype=torch.int32) if fused else None
    decode_fwd(q, kc, vc, _paged.cache_strides(kc, layout), _paged.cache_strides(vc, layout), indptr, indices, last,
               page_size, hk, out, lse, chunk=torch.tensor([chunk or 0], dtype=torch.int32), num_splits=splits,
               o_part=o_part, lse_part=lse_part, sm_scale=d ** -0.5, window_left=window_left,
               logits_soft_cap=soft_cap, alibi_slopes=ref.alibi_slopes(hq) if mode == "ALIBI" else None,
               rope=(2.0, 1e4) if mode == "ROPE_LLAMA" else None, block_n=block_n, counters=counters)
    if fused:
        assert not counters.any(), "the merge tickets must be left at zero for the next launch"
    want, want_lse = ref.batch_decode_with_paged_kv_cache(
        q, cache.nan_to_num(), indptr, indices, last, layout, window_left=window_left, logits_soft_cap=soft_cap,
        pos_encoding_mode=mode, rope_scale=2.0, compute_dtype=torch.float64)
    return out, lse, want, want_lse


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("chunk", [None, 24])
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("fused", [False, True])
def test_decode_matches_reference(layout, page_size, chunk, hq, hk, fused):
    if fused and chunk is None:
        pytest.skip("the fused merge exists only with a split")
    out, lse, want, want_lse = _run([0, 1, 50, 17], page_size, hq, hk, 32, layout, torch.float16, chunk, fused=fused)
    assert not out.isnan().any() and not lse.isnan().any(), "output element left unwritten"
    assert rel_err(out, want) < 2e-3
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_finite_lse_close(lse, want_lse.float(), atol=2e-3)


@pytest.mark.parametrize("mode", ["ALIBI", "ROPE_LLAMA"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_position_encodings(mode, chunk):
    out, lse, want, want_lse = _run([3, 40, 0], 4, 4, 2, 32, "NHD", torch.float32, chunk, mode=mode,
                                    fused=chunk is not None)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@pytest.mark.parametrize("window_left,soft_cap", [(7, 0.0), (0, 0.0), (-1, 2.0), (20, 3.0)])
@pytest.mark.parametrize("chunk", [None, 16])
def test_window_and_soft_cap(window_left, soft_cap, chunk):
    out, lse, want, want_lse = _run([1, 45, 9], 3, 4, 1, 32, "HND", torch.float32, chunk, window_left=window_left,
                                    soft_cap=soft_cap, fused=chunk is not None)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@pytest.mark.parametrize("d", [64, 40])
def test_head_dims(d):
    out, lse, want, want_lse = _run([33, 2], 16, 2, 1, d, "NHD", torch.float16, 16)
    assert rel_err(out, want) < 2e-3
    assert_finite_lse_close(lse, want_lse.float(), atol=2e-3)


@pytest.mark.parametrize("page_size,flags", [(8, 3), (8, 4), (6, 6), (1, 5)])
def test_address_flags(monkeypatch, page_size, flags):
    """Each ADDR variant of the key gather (shift/mask page index, one offset for K and V, 64-bit slots) reads
    the same keys as the plain one; the cache slice of `_run` lets K and V share strides, so bit 2 is real."""
    import pagoda.kernels.attention.decode as D
    seen = []
    monkeypatch.setattr(D, "addr_flags", lambda *a: seen.append(flags) or flags)
    out, lse, want, want_lse = _run([37, 16, 1], page_size, 4, 2, 32, "NHD", torch.float16, 16 if flags & 1 else None,
                                    fused=bool(flags & 1))
    assert seen, "decode_fwd must take its ADDR from addr_flags"
    assert rel_err(out, want) < 2e-3
    assert_finite_lse_close(lse, want_lse.float(), atol=2e-3)

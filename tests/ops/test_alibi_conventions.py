"""ALiBi follows the API it is called through.

FlashInfer (`single_prefill_with_kv_cache`, the paged and ragged prefill wrappers, decode): the bias is
``slope * (key_pos - query_pos)``, signed, query ``i`` of ``qo_len`` sitting at key position ``i + kv_len - qo_len``,
with and without a causal mask. flash-attn (`flash_attn_func`, varlen): ``-slope * |query_pos - key_pos|``. The two
agree left of the diagonal only. Oracles: float64, written from the peers' documented semantics; slopes are the
ALiBi paper's geometric series (FlashInfer's ``get_alibi_slopes``). The FlashInfer API's LSE is base 2.

The same calls also run on the kernels under the interpreter (``TRITON_INTERPRET=1``; fp16 and fp32).
"""
import math
import os

import pytest
import torch

import pagoda
from pagoda import _switches
from pagoda.ops import prefill as pf
from pagoda.reference.decode import alibi_slopes
from tests.helpers import assert_finite_lse_close
from tests.paged_utils import empty_cache, fill_cache, random_page_table

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _slopes(n: int) -> torch.Tensor:
    """The ALiBi paper's slopes: ``2^(-8i/m)``, i = 1..m (m the largest power of two <= n), then the odd terms of
    the 2m series for the remaining heads."""
    m = 2 ** math.floor(math.log2(n))
    first = [(2.0 ** (-8.0 / m)) ** i for i in range(1, m + 1)]
    rest = [(2.0 ** (-4.0 / m)) ** i for i in range(1, 2 * (n - m), 2)]
    return torch.tensor(first + rest, dtype=torch.float64)


def _oracle(q, k, v, causal: bool, signed: bool):
    """One request, float64: q ``[qo, Hq, D]``, k/v ``[kv, Hk, D]`` -> out ``[qo, Hq, D]``, LSE ``[qo, Hq]``
    (natural log). ``signed``: FlashInfer's bias; otherwise flash-attn's."""
    qo, hq, d = q.shape
    kv, hk = k.shape[0], k.shape[1]
    qd = q.double()
    kd = k.double().repeat_interleave(hq // hk, 1)
    vd = v.double().repeat_interleave(hq // hk, 1)
    s = torch.einsum("qhd,khd->hqk", qd, kd) * d ** -0.5
    pos_q = torch.arange(qo, dtype=torch.float64)[:, None] + (kv - qo)
    pos_k = torch.arange(kv, dtype=torch.float64)[None, :]
    bias = (pos_k - pos_q) if signed else -(pos_q - pos_k).abs()
    s = s + _slopes(hq)[:, None, None] * bias
    if causal:
        s = s.masked_fill(pos_k > pos_q, -math.inf)
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1).nan_to_num(0.0), vd)
    return out, lse.t()


def _close(out, want, dtype, what):
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol, msg=what)


def _kernel_path(monkeypatch, on: bool):
    if on:
        if not INTERPRET:
            pytest.skip("the kernel path runs on the CPU only under TRITON_INTERPRET=1")
        monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)


def test_slopes_are_flashinfers():
    for n in (1, 3, 4, 6, 8, 12, 32):
        torch.testing.assert_close(alibi_slopes(n).double(), _slopes(n))


PATHS = [False, True]    # reference path, kernel path (interpreter)


@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("qo,kv,causal", [(17, 40, False), (40, 17, False), (9, 9, False), (17, 40, True),
                                          (1, 33, False)])
def test_single_prefill_signed_alibi(monkeypatch, kernel, dtype, qo, kv, causal):
    _kernel_path(monkeypatch, kernel)
    torch.manual_seed(qo * 100 + kv)
    q = torch.randn(qo, 4, 32, dtype=dtype)
    k, v = torch.randn(kv, 2, 32, dtype=dtype), torch.randn(kv, 2, 32, dtype=dtype)
    out, lse = pagoda.single_prefill_with_kv_cache(q, k, v, causal=causal, pos_encoding_mode="ALIBI",
                                                   return_lse=True)
    want, want_lse = _oracle(q, k, v, causal, signed=True)
    _close(out, want, dtype, "out")
    assert_finite_lse_close(lse.double(), want_lse / math.log(2.0), atol=1e-3 if dtype == torch.float16 else 1e-4)
    if not causal and qo > 1:   # the flash-attn form really is different here: the test can tell them apart
        other, _ = _oracle(q, k, v, causal, signed=False)
        assert (want - other).abs().max() > 1e-2


@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("causal", [False, True])
def test_paged_and_ragged_wrappers_signed_alibi(monkeypatch, kernel, causal):
    _kernel_path(monkeypatch, kernel)
    torch.manual_seed(1)
    dtype, hq, hk, d, ps = torch.float16, 4, 2, 32, 8
    kv_lens, qo_lens = [30, 9, 1, 20], [12, 9, 1, 3] if causal else [12, 20, 1, 3]
    qs = [torch.randn(n, hq, d, dtype=dtype) for n in qo_lens]
    ks = [torch.randn(n, hk, d, dtype=dtype) for n in kv_lens]
    vs = [torch.randn(n, hk, d, dtype=dtype) for n in kv_lens]
    indptr, indices, last, max_pages = random_page_table(kv_lens, ps)
    cache = empty_cache(max_pages, ps, hk, d, "NHD", dtype)
    fill_cache(cache, ks, vs, indptr, indices, ps, "NHD")
    cache = cache.nan_to_num()
    qo_indptr = torch.tensor([0] + list(torch.tensor(qo_lens).cumsum(0)), dtype=torch.int32)
    kv_indptr = torch.tensor([0] + list(torch.tensor(kv_lens).cumsum(0)), dtype=torch.int32)
    q = torch.cat(qs)
    ws = torch.empty(1 << 20, dtype=torch.uint8)
    paged = pf.BatchPrefillWithPagedKVCacheWrapper(ws)
    paged.plan(qo_indptr, indptr, indices, last, hq, hk, d, ps, causal=causal, pos_encoding_mode="ALIBI",
               q_data_type=dtype)
    ragged = pf.BatchPrefillWithRaggedKVCacheWrapper(ws)
    ragged.plan(qo_indptr, kv_indptr, hq, hk, d, causal=causal, pos_encoding_mode="ALIBI", q_data_type=dtype)
    results = {"paged": paged.run(q, cache, return_lse=True),
               "ragged": ragged.run(q, torch.cat(ks), torch.cat(vs), return_lse=True)}
    for name, (out, lse) in results.items():
        for b in range(len(kv_lens)):
            want, want_lse = _oracle(qs[b], ks[b], vs[b], causal, signed=True)
            rows = slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))
            _close(out[rows], want, dtype, f"{name} request {b}")
            assert_finite_lse_close(lse[rows].double(), want_lse / math.log(2.0), atol=1e-3)


@pytest.mark.parametrize("kernel", PATHS)
def test_decode_alibi_is_both_forms(monkeypatch, kernel):
    """One query at the end of the keys: every key is at or left of it, where both forms agree."""
    _kernel_path(monkeypatch, kernel)
    torch.manual_seed(2)
    q, k, v = torch.randn(4, 32), torch.randn(37, 4, 32), torch.randn(37, 4, 32)
    out, lse = pagoda.single_decode_with_kv_cache(q, k, v, pos_encoding_mode="ALIBI", return_lse=True)
    want, want_lse = _oracle(q[None], k, v, False, signed=True)
    _close(out, want[0], torch.float32, "out")
    torch.testing.assert_close(lse.double(), want_lse[0] / math.log(2.0), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_api_keeps_its_alibi(causal):
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 13, 4, 32), torch.randn(1, 21, 4, 32), torch.randn(1, 21, 4, 32)
    slopes = _slopes(4).float()
    out, lse, _ = pagoda.flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes, return_attn_probs=True)
    want, want_lse = _oracle(q[0], k[0], v[0], causal, signed=False)
    _close(out[0], want, torch.float32, "out")
    torch.testing.assert_close(lse[0].double(), want_lse.t(), atol=1e-4, rtol=1e-5)   # natural log

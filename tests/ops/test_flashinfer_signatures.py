"""FlashInfer 0.6 signatures: `single_prefill_with_kv_cache`'s argument order and ``backend=``, the plan keywords
of trtllm-gen (NotImplementedError naming them, never TypeError; multi-item scoring's are implemented:
tests/ops/test_multi_item_scoring.py), the deprecated
``forward`` / ``forward_return_lse`` (options given there replace the planned ones, k/v scales applied), backend
names in the wrappers' constructors, and top-level ``softmax``."""
import inspect
import math

import pytest
import torch

import pagoda
from pagoda.ops import prefill as pf
from tests.paged_utils import empty_cache, fill_cache, random_page_table

SINGLE_PREFILL_ORDER = ["q", "k", "v", "scale_q", "scale_k", "scale_v", "o_dtype", "custom_mask", "packed_custom_mask",
                        "causal", "kv_layout", "pos_encoding_mode", "use_fp16_qk_reduction", "sm_scale", "window_left",
                        "logits_soft_cap", "rope_scale", "rope_theta", "backend", "return_lse"]


def test_single_prefill_argument_order_and_backends():
    assert list(inspect.signature(pagoda.single_prefill_with_kv_cache).parameters) == SINGLE_PREFILL_ORDER
    q, k, v = torch.randn(5, 4, 32), torch.randn(9, 2, 32), torch.randn(9, 2, 32)
    want = pagoda.single_prefill_with_kv_cache(q, k, v, causal=True)
    for backend in ("auto", "fa2", "fa3", "trtllm-gen", "cudnn", "cutlass"):
        torch.testing.assert_close(pagoda.single_prefill_with_kv_cache(q, k, v, causal=True, backend=backend), want)
    torch.testing.assert_close(pagoda.single_prefill_with_kv_cache(q, k, v, None, None, None, torch.float32, None,
                                                                   None, True), want)
    with pytest.raises(ValueError, match="backend"):
        pagoda.single_prefill_with_kv_cache(q, k, v, backend="triton")
    with pytest.raises(NotImplementedError, match="scale_k"):
        pagoda.single_prefill_with_kv_cache(q, k, v, scale_k=torch.ones(2))
    with pytest.raises(NotImplementedError, match="o_dtype"):
        pagoda.single_prefill_with_kv_cache(q, k, v, o_dtype=torch.float16)
    ws = torch.empty(1 << 20, dtype=torch.uint8)
    for backend in ("fa2", "fa3", "trtllm-gen"):
        pagoda.BatchPrefillWithPagedKVCacheWrapper(ws, backend=backend)
        pagoda.BatchPrefillWithRaggedKVCacheWrapper(ws, backend=backend)
        pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, backend="nope")


def _paged(kv_lens, qo_lens, causal_ok=True):
    torch.manual_seed(0)
    hq, hk, d, ps = 4, 2, 32, 4
    indptr, indices, last, max_pages = random_page_table(kv_lens, ps)
    cache = empty_cache(max_pages, ps, hk, d, "NHD", torch.float32)
    ks = [torch.randn(n, hk, d) for n in kv_lens]
    vs = [torch.randn(n, hk, d) for n in kv_lens]
    fill_cache(cache, ks, vs, indptr, indices, ps, "NHD")
    qo_indptr = torch.tensor([0] + qo_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(sum(qo_lens), hq, d)
    return q, cache.nan_to_num(), ks, vs, qo_indptr, (indptr, indices, last), (hq, hk, d, ps)


@pytest.mark.parametrize("name,value", [("block_tables", torch.zeros(2, 3, dtype=torch.int32)),
                                        ("seq_lens", torch.zeros(2, dtype=torch.int32)),
                                        ("max_sequence_kv", 64)])
def test_unsupported_plan_keywords_name_themselves(name, value):
    q, cache, _, _, qo_indptr, meta, (hq, hk, d, ps) = _paged([9, 5], [3, 5])
    w = pf.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))
    with pytest.raises(NotImplementedError, match=name):
        w.plan(qo_indptr, *meta, hq, hk, d, ps, **{name: value}, q_data_type=torch.float32)
    w.plan(qo_indptr, *meta, hq, hk, d, ps, token_pos_in_items_len=0, q_data_type=torch.float32)   # the default


def _oracle(q, k, v, causal, scale):
    qo, kv = q.shape[0], k.shape[0]
    kd, vd = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kd) * scale
    if causal:
        s = s.masked_fill(torch.arange(kv)[None, :] > torch.arange(qo)[:, None] + kv - qo, -math.inf)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vd), torch.logsumexp(s, -1).t() / math.log(2.0)


def test_forward_return_lse_options_and_scales():
    q, cache, ks, vs, qo_indptr, meta, (hq, hk, d, ps) = _paged([9, 5], [3, 5])
    w = pf.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))
    w.plan(qo_indptr, *meta, hq, hk, d, ps, causal=True, q_data_type=torch.float32)
    # FlashInfer's forward_return_lse replaces the planned options: causal=False by default.
    out, lse = w.forward_return_lse(q, cache, k_scale=0.5, v_scale=2.0)
    for b, (a, e) in enumerate(((0, 3), (3, 8))):
        want, want_lse = _oracle(q[a:e], ks[b], vs[b], False, 0.5 * d ** -0.5)
        torch.testing.assert_close(out[a:e].double(), 2.0 * want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[a:e].double(), want_lse, atol=1e-5, rtol=1e-5)
    out_c = w.forward(q, cache, causal=True)
    want, _ = _oracle(q[3:8], ks[1], vs[1], True, d ** -0.5)
    torch.testing.assert_close(out_c[3:8].double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.run(q, cache), out_c)   # the plan is unchanged afterwards


def test_top_level_softmax():
    logits = torch.randn(3, 50)
    torch.testing.assert_close(pagoda.softmax(logits, temperature=0.7), torch.softmax(logits / 0.7, -1))

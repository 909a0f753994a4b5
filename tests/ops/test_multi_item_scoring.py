"""FlashInfer's multi-item scoring in `BatchPrefillWithPagedKVCacheWrapper.plan` (``prefix_len_ptr``,
``token_pos_in_items_ptr``, ``token_pos_in_items_len``, ``max_item_len_ptr``): against float64 attention under
an oracle mask written from FlashInfer's own test's description (a shared prefix every token sees; items led by
delimiters; causal inside an item; no token sees a delimiter or another item), on the CPU path and in the
interpreted masked kernel; bad input named."""
import math
import os

import pytest
import torch

import pagoda
from pagoda.reference import mask as mref
from tests.helpers import assert_finite_lse_close, rel_err
from tests.paged_utils import indptr_of, paged_inputs

LOG2E = 1.0 / math.log(2.0)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                 reason="runs the Triton kernel in the interpreter (TRITON_INTERPRET=1)")


def oracle(prefix: int, item_pos: list[int], qo: int, kv: int) -> torch.Tensor:
    """[qo, kv] visibility: keys prefix + t carry item_pos[t] (0 = a delimiter). Group-based, as FlashInfer's
    test reference builds it (a group = a delimiter and the tokens after it)."""
    group = [0] * prefix
    g = 0
    for p in item_pos[:kv - prefix]:
        g += p == 0
        group.append(g)
    delim = [False] * prefix + [p == 0 for p in item_pos[:kv - prefix]]
    m = torch.zeros(qo, kv, dtype=torch.bool)
    for q in range(qo):
        i = q + kv - qo
        for j in range(i + 1):
            if i < prefix or j < prefix:
                m[q, j] = True
            else:
                m[q, j] = group[i] == group[j] and not delim[i] and not delim[j]
    return m


def items(*lengths: int) -> list[int]:
    """Positions in item for items of these lengths, each led by a delimiter (position 0)."""
    return [p for n in lengths for p in range(n + 1)]


# (kv_len, qo_len, prefix, positions of keys prefix.., max_item_len): FlashInfer's first case, then a batch of
# three with queries inside the prefix and a request without items.
FLASHINFER_CASE = [(54, 37, 17, list(range(17)) + list(range(19)) + [0], 18)]
BATCH = [(40, 40, 11, items(6, 9, 11), 11), (30, 12, 10, items(4, 5, 8), 8), (9, 9, 9, [], 0)]


def _run(cases, page_size=5, hq=4, hk=2, d=32, dtype=torch.float32, stride=None, **opts):
    kv = [c[0] for c in cases]
    qo = [c[1] for c in cases]
    q, cache, keys, vals, meta = paged_inputs(kv, qo, page_size, hq, hk, d, "NHD", dtype, "cpu")
    stride = stride or max(max(len(c[3]) for c in cases), 1)
    pos = torch.zeros(len(cases) * stride, dtype=torch.int64)
    for b, c in enumerate(cases):
        pos[b * stride:b * stride + len(c[3])] = torch.tensor(c[3], dtype=torch.int64)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))
    w.plan(indptr_of(qo), *meta, hq, hk, d, page_size, causal=True, q_data_type=dtype,
           prefix_len_ptr=torch.tensor([c[2] for c in cases]).to(torch.uint32),
           token_pos_in_items_ptr=pos.to(torch.uint16), token_pos_in_items_len=stride,
           max_item_len_ptr=torch.tensor([c[4] for c in cases]).to(torch.uint16), **opts)
    out, lse = w.run(q, cache, return_lse=True)
    masks = [oracle(c[2], c[3], c[1], c[0]) for c in cases]
    kvs = [(k.double(), v.double()) for k, v in zip(keys, vals)]
    want, want_lse = mref.batch_masked_prefill(q.double(), kvs, indptr_of(qo), masks, compute_dtype=torch.float64,
                                               sm_scale=d ** -0.5, **opts)
    return out, lse, want, want_lse * LOG2E


def test_dense_mask_is_the_oracle():
    from pagoda.ops import _multi_item

    for cases in (FLASHINFER_CASE, BATCH):
        stride = max(len(c[3]) for c in cases) or 1
        pos = torch.zeros(len(cases) * stride, dtype=torch.int64)
        for b, c in enumerate(cases):
            pos[b * stride:b * stride + len(c[3])] = torch.tensor(c[3])
        got = _multi_item.dense_mask(torch.tensor([c[2] for c in cases]), pos, stride,
                                     torch.tensor([c[4] for c in cases]), [c[1] for c in cases],
                                     [c[0] for c in cases])
        want = torch.cat([oracle(c[2], c[3], c[1], c[0]).reshape(-1) for c in cases])
        assert torch.equal(got, want)


@pytest.mark.parametrize("cases", [FLASHINFER_CASE, BATCH], ids=["flashinfer-case", "batch"])
@pytest.mark.parametrize("opts", [{}, dict(pos_encoding_mode="ROPE_LLAMA", logits_soft_cap=30.0)])
def test_cpu_path(cases, opts):
    out, lse, want, want_lse = _run(cases, **opts)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_interpreted_masked_kernel(triton_on_cpu, dtype):
    out, lse, want, want_lse = _run(BATCH, dtype=dtype, hq=8, hk=2)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert rel_err(out, want) < tol
    assert_finite_lse_close(lse, want_lse.float(), atol=tol * 2)


def _peer_call(page_size=5, hq=4, hk=4, d=32, dtype=torch.float32):
    """FlashInfer's own test's call: a 0-d uint32 ``prefix_len_ptr`` for its batch of one, uint16 positions
    shorter than ``token_pos_in_items_len`` (100) and a one-entry ``max_item_len_ptr``."""
    kv, qo, prefix, item_pos, max_item = FLASHINFER_CASE[0]
    q, cache, keys, vals, meta = paged_inputs([kv], [qo], page_size, hq, hk, d, "NHD", dtype, "cpu")
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))
    w.plan(indptr_of([qo]), *meta, hq, hk, d, page_size, causal=True, q_data_type=dtype,
           pos_encoding_mode="ROPE_LLAMA", logits_soft_cap=30.0,
           prefix_len_ptr=torch.tensor(prefix).to(dtype=torch.uint32),
           token_pos_in_items_ptr=torch.tensor(item_pos).to(dtype=torch.uint16), token_pos_in_items_len=100,
           max_item_len_ptr=torch.tensor([max_item]).to(dtype=torch.uint16))
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = mref.batch_masked_prefill(q.double(), [(keys[0].double(), vals[0].double())], indptr_of([qo]),
                                               [oracle(prefix, item_pos, qo, kv)], compute_dtype=torch.float64,
                                               sm_scale=d ** -0.5, pos_encoding_mode="ROPE_LLAMA",
                                               logits_soft_cap=30.0)
    return out, lse, want, want_lse * LOG2E


def test_flashinfer_test_call_cpu_path():
    out, lse, want, want_lse = _peer_call()
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@interpreted
def test_flashinfer_test_call_interpreted(triton_on_cpu):
    out, lse, want, want_lse = _peer_call(dtype=torch.float16)
    assert rel_err(out, want) < 2e-3
    assert_finite_lse_close(lse, want_lse.float(), atol=4e-3)


def test_zero_dim_tensors_are_one_entry():
    from pagoda.ops import _multi_item

    kv, qo, prefix, item_pos, max_item = FLASHINFER_CASE[0]
    want = _multi_item.dense_mask(torch.tensor([prefix]), torch.tensor(item_pos), 100, torch.tensor([max_item]),
                                  [qo], [kv])
    got = _multi_item.dense_mask(torch.tensor(prefix, dtype=torch.uint32), torch.tensor(item_pos),
                                 100, torch.tensor(max_item, dtype=torch.uint16), [qo], [kv])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"prefix_len_ptr must hold one entry per request \(2\)"):
        _multi_item.dense_mask(torch.tensor(prefix), torch.tensor(item_pos + item_pos), len(item_pos),
                               torch.tensor([max_item, max_item]), [qo, qo], [kv, kv])


def _plan(**kw):
    q, cache, keys, vals, meta = paged_inputs([20], [20], 5, 2, 2, 16, "NHD", torch.float32, "cpu")
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))
    w.plan(indptr_of([20]), *meta, 2, 2, 16, 5, q_data_type=torch.float32, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(token_pos_in_items_ptr=torch.zeros(20, dtype=torch.int16)), "without prefix_len_ptr"),
    (dict(max_item_len_ptr=torch.zeros(1, dtype=torch.int16)), "without prefix_len_ptr"),
    (dict(prefix_len_ptr=torch.tensor([5])), "token_pos_in_items_ptr"),
    (dict(prefix_len_ptr=torch.tensor([5]), token_pos_in_items_ptr=torch.zeros(20, dtype=torch.int16)),
     "token_pos_in_items_len"),
    (dict(prefix_len_ptr=torch.tensor([5]), token_pos_in_items_ptr=torch.tensor(items(4, 9)),
          token_pos_in_items_len=15, max_item_len_ptr=torch.tensor([4])), "max_item_len_ptr"),
    (dict(prefix_len_ptr=torch.tensor([5]), token_pos_in_items_ptr=torch.tensor(items(4, 9)),
          token_pos_in_items_len=10), "past token_pos_in_items_len"),
    (dict(prefix_len_ptr=torch.tensor([25]), token_pos_in_items_ptr=torch.zeros(4, dtype=torch.int16),
          token_pos_in_items_len=4), "prefix_len_ptr"),
    (dict(prefix_len_ptr=torch.tensor([5]), token_pos_in_items_ptr=torch.tensor(items(4, 9)),
          token_pos_in_items_len=15, custom_mask=torch.ones(400, dtype=torch.bool)), "custom_mask"),
    (dict(prefix_len_ptr=torch.tensor([5.0]), token_pos_in_items_ptr=torch.tensor(items(4, 9)),
          token_pos_in_items_len=15), "integer"),
])
def test_bad_input_names_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _plan(**kw)


def test_more_queries_than_keys_is_an_error():
    q, cache, keys, vals, meta = paged_inputs([6], [6], 5, 2, 2, 16, "NHD", torch.float32, "cpu")
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="only 6 keys"):
        w.plan(indptr_of([8]), *meta, 2, 2, 16, 5, q_data_type=torch.float32, prefix_len_ptr=torch.tensor([2]),
               token_pos_in_items_ptr=torch.tensor(items(5)), token_pos_in_items_len=6)

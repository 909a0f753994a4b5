"""Custom masks in the prefill wrappers and single prefill (FlashInfer's ``custom_mask`` / ``packed_custom_mask``):
against the float64 masked reference on the CPU path, the masked Triton kernel in the interpreter (fp16/fp32),
tile skipping, bad input; the GPU cases under @gpu."""
import math
import os

import numpy as np
import pytest
import torch

import pagoda
from pagoda.ops import _mask
from pagoda.reference import mask as mref
from tests.helpers import assert_finite_lse_close, rel_err
from tests.ops import mask_utils as mu
from tests.paged_utils import indptr_of, paged_inputs

LOG2E = 1.0 / math.log(2.0)   # FlashInfer's API LSE is base 2; the reference's natural log
# The kernel on CPU tensors needs the interpreter (set by conftest where there is no CUDA device).
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                 reason="runs the Triton kernel in the interpreter (TRITON_INTERPRET=1)")


def _want(q, keys, vals, qo, masks, **kw):
    kv = [(k.double().cpu(), v.double().cpu()) for k, v in zip(keys, vals)]
    o, l = mref.batch_masked_prefill(q.double().cpu(), kv, indptr_of(qo), masks, compute_dtype=torch.float64,
                                     sm_scale=kw.pop("sm_scale", q.shape[-1] ** -0.5), **kw)
    return o, l * LOG2E


def _ws(device="cpu"):
    return torch.empty(1 << 20, dtype=torch.uint8, device=device)


def _paged_run(masks, kv, qo, *, page_size=16, hq=4, hk=2, d=32, layout="NHD", dtype=torch.float32, packed=False,
               causal=False, device="cpu", **opts):
    q, cache, keys, vals, meta = paged_inputs(kv, qo, page_size, hq, hk, d, layout, dtype, device)
    flat = mu.flat(masks).to(device)
    mask_kw = {"packed_custom_mask": pagoda.segment_packbits(flat, indptr_of([a * b for a, b in zip(qo, kv)], device),
                                                             bitorder="little")[0]} if packed else {"custom_mask": flat}
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(_ws(device), layout)
    w.plan(indptr_of(qo, device), *meta, hq, hk, d, page_size, causal=causal, q_data_type=dtype, **mask_kw, **opts)
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = _want(q, keys, vals, qo, masks, **opts)
    return out, lse, want, want_lse, w


KV = [0, 37, 130, 9, 70]
QO = [0, 5, 70, 9, 1]


def _masks(kind, qo=QO, kv=KV):
    if kind == "random":
        return [mu.random_mask(a, b) for a, b in zip(qo, kv)]
    if kind == "tree":
        return [mu.tree_mask(a, b) for a, b in zip(qo, kv)]
    if kind == "prefix_lm":
        return [mu.prefix_lm_mask(a, b, b // 3) for a, b in zip(qo, kv)]
    return [mu.with_empty_rows(mu.random_mask(a, b), range(0, a, 3)) for a, b in zip(qo, kv)]


# ---------------------------------------------------------------- CPU path (reference) and mask plumbing

@pytest.mark.parametrize("kind", ["random", "tree", "prefix_lm", "empty_rows"])
@pytest.mark.parametrize("packed", [False, True])
def test_cpu_paged_masks(kind, packed):
    masks = _masks(kind)
    out, lse, want, want_lse, _ = _paged_run(masks, KV, QO, packed=packed, causal=True)  # causal: ignored
    assert rel_err(out, want) < 1e-6
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-5)


def test_cpu_fully_masked_rows_are_zero_with_lse_minus_inf():
    masks = [torch.zeros(a, b, dtype=torch.bool) for a, b in zip(QO, KV)]
    out, lse, *_ = _paged_run(masks, KV, QO)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_mask_of_causal_tril_equals_causal_plan():
    # FlashInfer's own check: a tril custom mask (diagonal kv_len - qo_len) gives the causal output.
    kv, qo = [40, 70], [40, 9]
    masks = [torch.tril(torch.ones(a, b, dtype=torch.bool), diagonal=b - a) for a, b in zip(qo, kv)]
    out, lse, *_ , w = _paged_run(masks, kv, qo)
    q, cache, _, _, meta = paged_inputs(kv, qo, 16, 4, 2, 32, "NHD", torch.float32)
    w.plan(indptr_of(qo), *meta, 4, 2, 32, 16, custom_mask=mu.flat(masks), q_data_type=torch.float32)
    o_mask, l_mask = w.run(q, cache, return_lse=True)
    w.plan(indptr_of(qo), *meta, 4, 2, 32, 16, causal=True, q_data_type=torch.float32)
    o_causal, l_causal = w.run(q, cache, return_lse=True)
    assert rel_err(o_mask, o_causal) < 1e-6
    assert_finite_lse_close(l_mask, l_causal, atol=1e-5)


def test_window_combines_with_mask():
    masks = _masks("random")
    out, lse, want, want_lse, _ = _paged_run(masks, KV, QO, window_left=5)
    assert rel_err(out, want) < 1e-6
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-5)


def test_plan_words_and_tile_lists():
    # The kernel's view of the mask, checked bit by bit against the user's boolean masks.
    masks = [mu.random_mask(a, b, 0.3) for a, b in zip(QO, KV)]
    plan = _mask.plan_mask(mu.flat(masks), None, QO, KV, 2, 32, True, -1, "cpu")
    words = plan.words.to(torch.int64) & 0xFFFFFFFF
    for b, m in enumerate(masks):
        off, row_words, tile0 = plan.meta[b].tolist()
        for i in range(m.shape[0]):
            w = words[off + i * row_words: off + (i + 1) * row_words]
            bits = ((w[:, None] >> torch.arange(32)) & 1).bool().reshape(-1)
            assert torch.equal(bits[:m.shape[1]], m[i]) and not bits[m.shape[1]:].any()
    bm, bn = plan.config["BLOCK_M"], plan.config["BLOCK_N"]
    for b, m in enumerate(masks):
        tile0 = int(plan.meta[b, 2])
        for t in range(-(-m.shape[0] * 2 // bm)):
            rows = m[t * bm // 2:(t + 1) * bm // 2]
            want = [kt for kt in range(-(-m.shape[1] // bn)) if rows[:, kt * bn:(kt + 1) * bn].any()]
            lo, hi = plan.tile_indptr[tile0 + t: tile0 + t + 2].tolist()
            assert plan.tile_list[lo:hi].tolist() == want


@pytest.mark.parametrize("bitorder", ["big", "little"])
def test_packbits_match_numpy(bitorder):
    x = torch.rand(1001) < 0.5
    assert np.array_equal(pagoda.packbits(x, bitorder).numpy(), np.packbits(x.numpy(), bitorder=bitorder))
    indptr = torch.tensor([0, 7, 7, 300, 1001])
    packed, new = pagoda.segment_packbits(x, indptr, bitorder)
    want = [np.packbits(x[a:b].numpy(), bitorder=bitorder) for a, b in zip(indptr[:-1], indptr[1:])]
    assert np.array_equal(packed.numpy(), np.concatenate(want))
    assert new.tolist() == [0, 1, 1, 38, 126] and new.dtype == torch.int32


def test_single_prefill_mask_2d_and_hnd():
    qo, kv, hq, hk, d = 20, 45, 4, 1, 16
    q = torch.randn(qo, hq, d)
    k, v = torch.randn(kv, hk, d), torch.randn(kv, hk, d)
    m = mu.tree_mask(qo, kv)
    out, lse = pagoda.single_prefill_with_kv_cache(q, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(),
                                                   custom_mask=m, kv_layout="HND", return_lse=True)
    want, want_lse = _want(q, [k], [v], [qo], [m])
    assert rel_err(out, want) < 1e-6
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-5)


# ---------------------------------------------------------------- bad input

def test_bad_masks_raise_naming_the_argument():
    q, cache, _, _, meta = paged_inputs(KV, QO, 16, 4, 2, 32, "NHD", torch.float32)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(_ws())
    n = sum(a * b for a, b in zip(QO, KV))
    args = (indptr_of(QO), *meta, 4, 2, 32, 16)
    with pytest.raises(ValueError, match="custom_mask must hold"):
        w.plan(*args, custom_mask=torch.ones(n - 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="custom_mask"):
        w.plan(*args, custom_mask=torch.ones(n, dtype=torch.uint8))
    with pytest.raises(ValueError, match="packed_custom_mask must hold"):
        w.plan(*args, packed_custom_mask=pagoda.packbits(torch.ones(n, dtype=torch.bool), "little"))
    with pytest.raises(TypeError, match="packed_custom_mask"):
        w.plan(*args, packed_custom_mask=torch.ones(n, dtype=torch.bool))
    with pytest.raises(ValueError, match="custom_mask must hold"):
        pagoda.single_prefill_with_kv_cache(q[:5], torch.randn(7, 2, 32), torch.randn(7, 2, 32),
                                            custom_mask=torch.ones(5, 8, dtype=torch.bool))
    g = pagoda.BatchPrefillWithPagedKVCacheWrapper(
        _ws(), use_cuda_graph=True, qo_indptr_buf=torch.zeros(6, dtype=torch.int32),
        paged_kv_indptr_buf=torch.zeros(6, dtype=torch.int32), paged_kv_indices_buf=torch.zeros(64, dtype=torch.int32),
        paged_kv_last_page_len_buf=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="use_cuda_graph"):
        g.plan(*args, custom_mask=torch.ones(n, dtype=torch.bool))
    with pytest.raises(ValueError, match="bitorder"):
        pagoda.packbits(torch.ones(3, dtype=torch.bool), "middle")


# ---------------------------------------------------------------- the masked kernel in the interpreter

@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["random", "tree", "prefix_lm", "empty_rows"])
def test_interpreted_paged_masked_kernel(triton_on_cpu, dtype, kind):
    masks = _masks(kind)
    out, lse, want, want_lse, _ = _paged_run(masks, KV, QO, page_size=5, layout="HND", dtype=dtype, hq=8, hk=2)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert rel_err(out, want) < tol
    assert_finite_lse_close(lse, want_lse.float(), atol=tol * 2)


@pytest.mark.parametrize("opts", [dict(pos_encoding_mode="ROPE_LLAMA"), dict(logits_soft_cap=2.0),
                                  dict(window_left=9), dict(pos_encoding_mode="ALIBI")])
@interpreted
def test_interpreted_masked_kernel_options(triton_on_cpu, opts):
    # Masks inside the causal region, where every ALiBi convention (signed or |i - j|) agrees.
    masks = [mu.random_mask(a, b, 0.6, causal=True) for a, b in zip(QO, KV)]
    out, lse, want, want_lse, _ = _paged_run(masks, KV, QO, hq=4, hk=4, **opts)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@interpreted
def test_interpreted_masked_kernel_head_dim_256(triton_on_cpu):
    # head_dim > 128 takes 32-key tiles: one mask word per row and tile, the bit offset from the tile's start.
    assert _mask.tile_shape(64, 256, True)["BLOCK_N"] == 32
    kv, qo = [70, 33], [9, 33]
    masks = [mu.tree_mask(a, b) for a, b in zip(qo, kv)]
    out, lse, want, want_lse, _ = _paged_run(masks, kv, qo, hq=2, hk=1, d=256, page_size=16)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@interpreted
def test_interpreted_masked_kernel_signed_alibi_right_of_the_diagonal(triton_on_cpu):
    # FlashInfer's ALiBi is signed (slope * (key - query position)): keys right of the diagonal get a bonus.
    masks = _masks("random")
    out, lse, want, want_lse, _ = _paged_run(masks, KV, QO, hq=4, hk=4, pos_encoding_mode="ALIBI")
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse.float(), atol=1e-4)


@interpreted
def test_interpreted_ragged_and_single(triton_on_cpu):
    qo, kv, hq, hk, d = [3, 40, 0], [50, 40, 6], 4, 2, 32
    q = torch.randn(sum(qo), hq, d, dtype=torch.float16)
    keys = [torch.randn(n, hk, d, dtype=torch.float16) for n in kv]
    vals = [torch.randn(n, hk, d, dtype=torch.float16) for n in kv]
    masks = [mu.tree_mask(a, b) if a <= b else mu.random_mask(a, b) for a, b in zip(qo, kv)]
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(_ws())
    w.plan(indptr_of(qo), indptr_of(kv), hq, hk, d, custom_mask=mu.flat(masks), q_data_type=torch.float16,
           pos_encoding_mode="ROPE_LLAMA")
    out, lse = w.run(q, torch.cat(keys), torch.cat(vals), return_lse=True)
    want, want_lse = _want(q, keys, vals, qo, masks, pos_encoding_mode="ROPE_LLAMA")
    assert rel_err(out, want) < 2e-3
    assert_finite_lse_close(lse, want_lse.float(), atol=5e-3)
    o1, l1 = pagoda.single_prefill_with_kv_cache(q[3:43], keys[1], vals[1], custom_mask=masks[1], return_lse=True,
                                                pos_encoding_mode="ROPE_LLAMA")
    assert rel_err(o1, want[3:43]) < 2e-3
    assert_finite_lse_close(l1, want_lse[3:43].float(), atol=5e-3)


@interpreted
def test_interpreted_kernel_skips_hidden_tiles(triton_on_cpu):
    # NaN in every key/value that only hidden tiles hold: a read of one would turn the output NaN (0 * NaN).
    qo, kv, hq, hk, d, ps = [64], [256], 2, 2, 16, 16
    q, cache, keys, vals, meta = paged_inputs(kv, qo, ps, hq, hk, d, "NHD", torch.float32)
    m = torch.zeros(64, 256, dtype=torch.bool)
    m[:, :64] = torch.rand(64, 64) < 0.5          # key tile 0 of 64 keys only
    m[:, 192:] = torch.rand(64, 64) < 0.5         # and tile 3
    plan_cfg = _mask.tile_shape(64, d, True)
    assert plan_cfg["BLOCK_N"] == 64
    indptr, indices, _ = meta
    for t in range(64, 192):                      # poison keys 64..191 in the cache
        cache[indices[t // ps], :, t % ps] = float("nan")
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(_ws())
    w.plan(indptr_of(qo), *meta, hq, hk, d, ps, custom_mask=m.reshape(-1), q_data_type=torch.float32)
    assert w._mask.visited == 0.5
    out = w.run(q, cache)
    keys[0][64:192], vals[0][64:192] = 0, 0
    want, _ = _want(q, keys, vals, qo, [m])
    assert not out.isnan().any() and rel_err(out, want) < 1e-5


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "tree", "prefix_lm", "empty_rows"])
def test_gpu_paged_masks(dtype, kind):
    kv, qo = [1000, 37, 700, 2048], [300, 37, 1, 500]
    masks = _masks(kind, qo, kv)
    out, lse, want, want_lse, _ = _paged_run(masks, kv, qo, page_size=16, hq=32, hk=8, d=128, dtype=dtype,
                                             device="cuda")
    assert rel_err(out.cpu(), want) < 1e-2
    assert_finite_lse_close(lse.cpu(), want_lse.float(), atol=2e-2)


@pytest.mark.gpu
def test_gpu_ragged_mask_equals_causal():
    # FlashInfer's check on the ragged wrapper, with more queries than keys in one request (empty rows).
    qo, kv, hq, hk, d = [37, 577, 17], [54, 512, 97], 32, 4, 128
    q = torch.randn(sum(qo), hq, d, dtype=torch.float16, device="cuda")
    k = torch.randn(sum(kv), hk, d, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    m = mu.flat([torch.tril(torch.ones(a, b, dtype=torch.bool), diagonal=b - a) for a, b in zip(qo, kv)])
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(_ws("cuda"))
    w.plan(indptr_of(qo, "cuda"), indptr_of(kv, "cuda"), hq, hk, d, custom_mask=m.cuda())
    o_mask, l_mask = w.run(q, k, v, return_lse=True)
    w.plan(indptr_of(qo, "cuda"), indptr_of(kv, "cuda"), hq, hk, d, causal=True)
    o_causal, l_causal = w.run(q, k, v, return_lse=True)
    torch.testing.assert_close(o_mask, o_causal, rtol=1e-3, atol=1e-3)
    assert_finite_lse_close(l_mask.cpu(), l_causal.cpu(), atol=1e-3)


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and \
        __import__("pagoda.kernels.hopper.gluon", fromlist=["GLUON_OK"]).GLUON_OK


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("kind", ["random", "tree", "prefix_lm", "empty_rows", "empty_tile", "half_tiles"])
@pytest.mark.parametrize("page_size,layout,dtype", [(16, "NHD", torch.bfloat16), (64, "HND", torch.float16)])
def test_gpu_masks_take_the_gluon_kernel(monkeypatch, kind, page_size, layout, dtype):
    """Requests of >= 128 queries on sm_90: the Gluon kernel walks the listed 128 x 128 tiles (a query tile that
    sees nothing writes zeros / -inf, the last listed tile may be partial with NaN in the page's unused slots)."""
    import pagoda.kernels.hopper.paged as pp
    calls = []
    real = pp.prefill_paged_hopper
    monkeypatch.setattr(pp, "prefill_paged_hopper",
                        lambda *a, **k: calls.append(k.get("custom_mask") is not None) or real(*a, **k))
    monkeypatch.delenv("PAGODA_HOPPER_ATTN", raising=False)
    monkeypatch.setenv("PAGODA_MASKED_GLUON", "1")
    kv, qo = [1000, 37, 700, 2048, 300], [300, 37, 1, 500, 300]
    if kind == "empty_tile":      # request 3's first two query tiles see no key at all
        masks = [mu.with_empty_rows(m, range(256) if i == 3 else ()) for i, m in enumerate(_masks("random", qo, kv))]
    elif kind == "half_tiles":
        masks = [mu.block_half_empty(a, b, 128, 128) for a, b in zip(qo, kv)]
    else:
        masks = _masks(kind, qo, kv)
    out, lse, want, want_lse, w = _paged_run(masks, kv, qo, page_size=page_size, layout=layout, hq=32, hk=8, d=128,
                                             dtype=dtype, device="cuda")
    assert calls and all(calls), "the masked call did not take the Gluon kernel"
    assert w._mask.gluon_tiles is not None
    assert not out.isnan().any() and rel_err(out.cpu(), want) < 1e-2
    assert_finite_lse_close(lse.cpu(), want_lse.float(), atol=2e-2)
    assert torch.equal(lse.cpu().isinf(), want_lse.isinf())


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and Gluon")
def test_gpu_gluon_mask_with_window_equals_triton_kernel(monkeypatch):
    """A window folded into the bits, through the Gluon kernel and (PAGODA_HOPPER_ATTN=0) the Triton one."""
    kv, qo = [900, 2000], [600, 256]
    masks = _masks("random", qo, kv)
    monkeypatch.delenv("PAGODA_HOPPER_ATTN", raising=False)
    monkeypatch.setenv("PAGODA_MASKED_GLUON", "1")
    torch.manual_seed(0)
    a, la, want, want_lse, w = _paged_run(masks, kv, qo, hq=32, hk=8, d=128, dtype=torch.bfloat16, device="cuda",
                                          window_left=300)
    assert w._mask.gluon_tiles is not None
    monkeypatch.setenv("PAGODA_HOPPER_ATTN", "0")
    torch.manual_seed(0)       # the same inputs
    b, lb, _, _, w2 = _paged_run(masks, kv, qo, hq=32, hk=8, d=128, dtype=torch.bfloat16, device="cuda",
                                 window_left=300)
    assert w2._mask.gluon_tiles is None
    assert rel_err(a.cpu(), want) < 1e-2 and rel_err(a, b) < 1e-2
    assert_finite_lse_close(la.cpu(), lb.cpu(), atol=2e-2)
    assert torch.equal(la.isinf(), lb.isinf())

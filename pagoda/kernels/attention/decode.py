"""Split-KV ("flash-decoding") attention for one query token per request over a paged KV cache.

Grid ``(batch, num_kv_heads, splits)``. A program owns one request, one KV head and one chunk of
``chunk`` keys, and computes all ``group = num_qo_heads / num_kv_heads`` query heads that share the KV
head at once (a ``[GROUP_PAD, D] x [D, BLOCK_N]`` dot), so each KV page is read from memory once.
Keys are gathered token by token through the page table (page ``kv_indices[indptr[b] + t // page_size]``,
slot ``t % page_size``), which serves every page size from 1 up and both layouts (strides).

Online softmax in base 2 as in `attention_fwd`: ``m`` running max, ``l`` running sum, ``acc`` running
``sum p v``; a row that has seen no key keeps ``m = -inf`` and subtracts 0 instead, so 2^(-inf) = 0.

With ``SPLIT`` the program writes the chunk's normalised output and its base-2 LSE ``m + log2 l`` to the
workspace, and `_merge_kernel` combines a request's chunks (grid ``(batch, num_qo_heads)``):
``out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)``, ``lse = (M + log2 sum_s 2^(lse_s - M)) ln 2``.
The chunk length is read from device memory, so a captured CUDA graph replays correctly for any
lengths: `plan` only rewrites that scalar and the page table. Programs past a request's last chunk
exit; the merge reads only ``ceil(kv_len / chunk)`` chunks.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pagoda.kernels._common import LN2_JIT, LOG2E, LOG2E_JIT
from pagoda.kernels.attention.paged_tile import addr_flags, paged_offsets, paged_scores, rope_rows, softmax_pv_update
from pagoda.kernels.launch.fast import launch, next_pow2


@triton.jit
def _kv_len(KV_INDPTR, KV_LAST, b, page_size):
    p0 = tl.load(KV_INDPTR + b)
    n_pages = tl.load(KV_INDPTR + b + 1) - p0
    last = tl.load(KV_LAST + b)
    return p0, tl.where(n_pages > 0, (n_pages - 1) * page_size + last, 0)


@triton.jit
def _decode_tile(acc, l_i, m_i, q, K_H, V_H, KV_INDICES, p0, t, hi, offs_d, partner, page_size, page_shift,
                 stride_kp, stride_kt, stride_vp, stride_vt, qk_scale, softcap_log2, rope_rcp_scale, log2_theta,
                 slope_log2, kv_len, KM_B, stride_kmt, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, ROPE: tl.constexpr,
                 IEEE: tl.constexpr, ADDR: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """One tile of keys ``t [BLOCK_N]`` (all below ``hi`` unless MASKED): the updated (acc, l_i, m_i).
    HAS_KEY_MASK: key ``t`` is seen only where the request's mask row ``KM_B[t * stride_kmt]`` is nonzero."""
    valid = t < hi
    off_k, off_v = paged_offsets(KV_INDICES, p0, t, valid, page_size, page_shift, stride_kp, stride_kt, stride_vp,
                                 stride_vt, MASKED, ADDR)
    sc = paged_scores(q, K_H, off_k, t, valid, offs_d, partner, qk_scale, softcap_log2, rope_rcp_scale, log2_theta,
                      HEAD_DIM, HEAD_DIM_PAD, MASKED, HAS_SOFTCAP, ROPE, IEEE)
    if HAS_ALIBI:
        sc = sc - slope_log2[:, None] * (kv_len - 1 - t).to(tl.float32)[None, :]
    if HAS_KEY_MASK:
        seen = tl.load(KM_B + t * stride_kmt, mask=valid, other=0) != 0
        sc = tl.where(seen[None, :], sc, float("-inf"))
    elif MASKED:
        sc = tl.where(valid[None, :], sc, float("-inf"))
    return softmax_pv_update(acc, l_i, m_i, sc, V_H, off_v, valid, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED, IEEE)


@triton.jit
def _decode_kernel(
    Q, K, V, KV_INDPTR, KV_INDICES, KV_LAST, CHUNK, SLOPES, O, LSE,
    stride_qb, stride_qh,
    stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_sb,
    page_size, page_shift, group_size, qk_scale, softcap_log2, window_left, rope_rcp_scale, log2_theta,
    COUNTER, OUT_F, LSE_F, stride_fob, stride_foh, stride_flb, KEY_MASK, stride_kmb, stride_kmt,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    ROPE: tl.constexpr, IEEE: tl.constexpr, FUSED_MERGE: tl.constexpr = False, ADDR: tl.constexpr = 0,
    WHOLE_TILES: tl.constexpr = False, HAS_KEY_MASK: tl.constexpr = False,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    p0, kv_len = _kv_len(KV_INDPTR, KV_LAST, b, page_size)
    if SPLIT:
        chunk = tl.load(CHUNK)
        lo = s * chunk
        if lo >= kv_len:
            if FUSED_MERGE:
                if (kv_len == 0) & (s == 0):     # no chunk will merge an empty request: write its result here
                    _store_empty(OUT_F, LSE_F, b, kvh, group_size, stride_fob, stride_foh, stride_flb,
                                 HEAD_DIM, HEAD_DIM_PAD, GROUP_PAD)
            return
        hi = tl.minimum(kv_len, lo + chunk)
    else:
        lo = kv_len * 0
        hi = kv_len
    if HAS_WINDOW:
        lo = tl.maximum(lo, kv_len - 1 - window_left)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * group_size + offs_g
    gmask = offs_g < group_size
    dmask = offs_d < HEAD_DIM
    q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    partner = offs_d
    if ROPE:
        partner = tl.where(offs_d < HEAD_DIM // 2, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
        q2 = tl.load(q_ptrs + partner[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
        q_pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + (kv_len - 1)
        q = rope_rows(q, q2, q_pos, offs_d, rope_rcp_scale, log2_theta, HEAD_DIM).to(Q.dtype.element_ty)
    slope_log2 = tl.zeros([GROUP_PAD], dtype=tl.float32)
    if HAS_ALIBI:
        slope_log2 = tl.load(SLOPES + b * stride_sb + heads, mask=gmask, other=0.0) * LOG2E_JIT

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    K_H = K + kvh.to(tl.int64) * stride_kh     # HF's [b, h, s, d] cache: a head stride of s * d elements
    V_H = V + kvh.to(tl.int64) * stride_vh
    KM_B = KEY_MASK + b.to(tl.int64) * stride_kmb
    if WHOLE_TILES:
        # Whole tiles without bounds masks, then the ragged last tile (masked).
        hi_full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
        for start in range(lo, hi_full, BLOCK_N):
            acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, K_H, V_H, KV_INDICES, p0, start + offs_n, hi, offs_d,
                                         partner, page_size, page_shift, stride_kp, stride_kt, stride_vp, stride_vt,
                                         qk_scale, softcap_log2, rope_rcp_scale, log2_theta, slope_log2, kv_len,
                                         KM_B, stride_kmt, HEAD_DIM, HEAD_DIM_PAD, False, HAS_SOFTCAP, HAS_ALIBI,
                                         ROPE, IEEE, ADDR, HAS_KEY_MASK)
        if hi_full < hi:
            acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, K_H, V_H, KV_INDICES, p0, hi_full + offs_n, hi, offs_d,
                                         partner, page_size, page_shift, stride_kp, stride_kt, stride_vp, stride_vt,
                                         qk_scale, softcap_log2, rope_rcp_scale, log2_theta, slope_log2, kv_len,
                                         KM_B, stride_kmt, HEAD_DIM, HEAD_DIM_PAD, True, HAS_SOFTCAP, HAS_ALIBI,
                                         ROPE, IEEE, ADDR, HAS_KEY_MASK)
    else:
        for start in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, K_H, V_H, KV_INDICES, p0, start + offs_n, hi, offs_d,
                                         partner, page_size, page_shift, stride_kp, stride_kt, stride_vp, stride_vt,
                                         qk_scale, softcap_log2, rope_rcp_scale, log2_theta, slope_log2, kv_len,
                                         KM_B, stride_kmt, HEAD_DIM, HEAD_DIM_PAD, True, HAS_SOFTCAP, HAS_ALIBI,
                                         ROPE, IEEE, ADDR, HAS_KEY_MASK)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = O + b.to(tl.int64) * stride_ob + s * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    l_ptrs = LSE + b.to(tl.int64) * stride_lb + s * stride_ls + heads
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    if SPLIT:
        tl.store(l_ptrs, lse2, mask=gmask)
        if FUSED_MERGE:
            # The last chunk of (request, KV head) to finish merges all of them: every thread's partial
            # stores are ordered before the barrier, the ticket is taken with acq_rel semantics (release
            # for our partials, acquire for the others'), and the merge reads partials from L2 (.cg).
            tl.debug_barrier()
            slot = COUNTER + b * tl.num_programs(1) + kvh
            ticket = tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu")
            if ticket == (kv_len + chunk - 1) // chunk - 1:
                tl.atomic_xchg(slot, 0, sem="relaxed", scope="gpu")    # zero again: graph replays start clean
                _merge_group(O, LSE, OUT_F, LSE_F, b, heads, gmask, offs_d, dmask, (kv_len + chunk - 1) // chunk,
                             stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_fob, stride_foh,
                             stride_flb, HEAD_DIM_PAD, GROUP_PAD)
    else:
        tl.store(l_ptrs, lse2 * LN2_JIT, mask=gmask)


@triton.jit
def _store_empty(OUT_F, LSE_F, b, kvh, group_size, stride_fob, stride_foh, stride_flb,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP_PAD: tl.constexpr):
    """Zeros and LSE -inf for the query heads of one KV head of a request with no keys."""
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kvh * group_size + offs_g
    gmask = offs_g < group_size
    zero = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    tl.store(OUT_F + b.to(tl.int64) * stride_fob + heads[:, None] * stride_foh + offs_d[None, :],
             zero.to(OUT_F.dtype.element_ty), mask=gmask[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE_F + b.to(tl.int64) * stride_flb + heads, tl.full([GROUP_PAD], float("-inf"), tl.float32),
             mask=gmask)


@triton.jit
def _merge_group(O_PART, LSE_PART, OUT_F, LSE_F, b, heads, gmask, offs_d, dmask, n_splits,
                 stride_pb, stride_ps, stride_ph, stride_lpb, stride_lps, stride_fob, stride_foh, stride_flb,
                 HEAD_DIM_PAD: tl.constexpr, GROUP_PAD: tl.constexpr):
    """LSE merge of ``n_splits`` partials (base-2 LSE) of the query heads ``heads``, online over the splits."""
    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    base_o = O_PART + b.to(tl.int64) * stride_pb + heads[:, None] * stride_ph + offs_d[None, :]
    base_l = LSE_PART + b.to(tl.int64) * stride_lpb + heads
    for sp in range(0, n_splits):
        ls = tl.load(base_l + sp * stride_lps, mask=gmask, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(base_o + sp * stride_ps, mask=gmask[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, ls)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_sub)
        w = tl.exp2(ls - m_sub)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_sum = l_sum * alpha + w
        m = m_new
    empty = l_sum == 0.0
    out = acc / tl.where(empty, 1.0, l_sum)[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l_sum))) * LN2_JIT)
    tl.store(OUT_F + b.to(tl.int64) * stride_fob + heads[:, None] * stride_foh + offs_d[None, :],
             out.to(OUT_F.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    tl.store(LSE_F + b.to(tl.int64) * stride_flb + heads, lse, mask=gmask)


@triton.jit
def _merge_kernel(
    O_PART, LSE_PART, KV_INDPTR, KV_LAST, CHUNK, OUT, LSE,
    stride_pb, stride_ps, stride_ph, stride_lpb, stride_lps, stride_ob, stride_oh, stride_lb,
    page_size,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MAX_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    _, kv_len = _kv_len(KV_INDPTR, KV_LAST, b, page_size)
    chunk = tl.load(CHUNK)
    n_splits = (kv_len + chunk - 1) // chunk
    offs_s = tl.arange(0, MAX_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    smask = offs_s < n_splits
    lse = tl.load(LSE_PART + b.to(tl.int64) * stride_lpb + offs_s * stride_lps + h, mask=smask,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_sub)
    o_ptrs = O_PART + b.to(tl.int64) * stride_pb + offs_s[:, None] * stride_ps + h * stride_ph + offs_d[None, :]
    o = tl.load(o_ptrs, mask=smask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    l_sum = tl.sum(w, 0)
    empty = l_sum == 0.0
    out = tl.sum(w[:, None] * o, 0) / tl.where(empty, 1.0, l_sum)
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    lse_out = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l_sum))) * LN2_JIT)
    tl.store(LSE + b.to(tl.int64) * stride_lb + h, lse_out)


# Launch configuration of the decode kernel: warps and software-pipeline stages (keys per tile:
# `default_block_n`).
NUM_WARPS = 4
NUM_STAGES = 3
# Merge the split partials in the decode kernel itself (last chunk to finish) when the caller hands
# counters and there are few splits; more splits take the separate `_merge_kernel` launch. H200, graph
# replay: b16 ctx 4k, 3 splits: 81.9 µs fused vs 85.8 µs two launches; b1 ctx 32k, 64 splits:
# 79.9 vs 52.0 (the last program reads 64 partials one after another; the merge kernel reads them at once).
FUSED_MAX_SPLITS = 8


def merge_is_fused(num_splits: int, has_counters: bool) -> bool:
    """Whether `decode_fwd` merges the splits inside the decode kernel (one launch) or launches the merge."""
    return 0 < num_splits <= FUSED_MAX_SPLITS and has_counters


def whole_tiles(page_size: int, addr: int) -> bool:
    """Whether the key loop runs whole tiles without bounds masks (plus one masked last tile). Measured on
    an H200 (graph replay, b64 ctx 4096, GQA 32/8, d 128): page 16 with the shift/mask gather
    258 us against 264 all-masked; but page 1 335 against 262, and a non-power-of-two page (integer
    division) 359: there every tile stays masked."""
    return bool(addr & 1) and page_size >= 16


def default_block_n(head_dim: int) -> int:
    """Keys per tile: 64, or 32 above head_dim 128 (the tile's registers)."""
    return 64 if head_dim <= 128 else 32


def decode_fwd(q, k_cache, v_cache, k_strides, v_strides, kv_indptr, kv_indices, kv_last_page_len, page_size,
               num_kv_heads: int, out, lse, *, chunk, num_splits: int, o_part=None, lse_part=None, sm_scale: float,
               window_left: int = -1, logits_soft_cap: float = 0.0, alibi_slopes=None, rope=None,
               block_n: int | None = None, num_warps: int | None = None, counters=None, key_mask=None) -> None:
    """Launch decode (and merge when ``num_splits > 0``); arguments validated by `pagoda.ops.decode`.

    q ``[B, Hq, D]`` (last dim contiguous); k/v caches 4-D with ``(page, token, head)`` strides;
    out ``[B, Hq, D]``; lse float32 ``[B, Hq]`` (natural log). ``num_splits == 0``: one program per
    (request, KV head), writing out/lse directly. Otherwise ``chunk`` is an int32 ``[1]`` device
    tensor (keys per split) and ``o_part [B, num_splits, Hq, D]`` / ``lse_part [B, num_splits, Hq]``
    float32 workspace views. ``counters``: with a split, an int32 tensor of at least ``B * num_kv_heads``
    zeros (left zero after every launch): the last chunk of each (request, KV head) merges them in the same
    kernel instead of a second launch. ``rope``: None or ``(rope_scale, rope_theta)`` (ROPE_LLAMA on the fly).
    ``alibi_slopes``: float32 ``[Hq]`` or ``[B, Hq]``. A request's KV length is
    ``(pages - 1) * page_size + kv_last_page_len`` (a block-table caller may pass a last length below 1).
    ``key_mask``: None or ``[B, >= max KV length]`` bool/uint8 (any strides): key ``t`` of request ``b`` (its
    position in the request, page table resolved) is seen only where ``key_mask[b, t]`` is nonzero, on top of
    the window; a request that sees no key gets zeros (LSE -inf).
    """
    batch, hq, dim = q.shape
    hk = num_kv_heads
    if batch == 0:
        return
    group = hq // hk
    dim_pad = max(16, next_pow2(dim))
    block_n = block_n or default_block_n(dim)
    split = num_splits > 0
    if softcap := float(logits_soft_cap):
        qk_scale, softcap_log2 = sm_scale / softcap, softcap * LOG2E
    else:
        qk_scale, softcap_log2 = sm_scale * LOG2E, 0.0
    rope_rcp_scale, log2_theta = (1.0, 0.0) if rope is None else (1.0 / rope[0], math.log2(rope[1]))
    dst_o, dst_l = (o_part, lse_part) if split else (out, lse)
    so = (dst_o.stride(0), dst_o.stride(1), dst_o.stride(2)) if split else (out.stride(0), 0, out.stride(1))
    sl = (dst_l.stride(0), dst_l.stride(1)) if split else (lse.stride(0), 0)
    fused = merge_is_fused(num_splits, counters is not None)
    addr = addr_flags(page_size, k_strides, v_strides)
    grid = (batch, hk, max(num_splits, 1))
    launch(
        _decode_kernel, grid,
        q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, chunk if split else kv_indptr,
        alibi_slopes if alibi_slopes is not None else q, dst_o, dst_l,
        q.stride(0), q.stride(1), *k_strides, *v_strides, *so, *sl,
        alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        page_size, page_size.bit_length() - 1, group, qk_scale, softcap_log2, window_left, rope_rcp_scale,
        log2_theta, counters if fused else kv_indptr, out, lse, out.stride(0), out.stride(1), lse.stride(0),
        key_mask.view(torch.uint8) if key_mask is not None else kv_indptr,
        *(key_mask.stride() if key_mask is not None else (0, 0)),
        HEAD_DIM=dim, HEAD_DIM_PAD=dim_pad, GROUP_PAD=max(16, next_pow2(group)), BLOCK_N=block_n,
        SPLIT=split, HAS_WINDOW=window_left >= 0, HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        ROPE=rope is not None, IEEE=q.dtype == torch.float32, FUSED_MERGE=fused,
        ADDR=addr, WHOLE_TILES=whole_tiles(page_size, addr), HAS_KEY_MASK=key_mask is not None,
        num_warps=num_warps or NUM_WARPS, num_stages=NUM_STAGES,
    )
    if split and not fused:
        launch(
            _merge_kernel, (batch, hq),
            o_part, lse_part, kv_indptr, kv_last_page_len, chunk, out, lse,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), page_size,
            HEAD_DIM=dim, HEAD_DIM_PAD=dim_pad, MAX_SPLITS=max(2, next_pow2(num_splits)),
            num_warps=4 if dim * num_splits <= 8192 else 8,
        )

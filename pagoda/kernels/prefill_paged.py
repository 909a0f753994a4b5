"""FlashAttention-2-structured prefill/append attention: ragged queries against a paged KV cache.

Grid ``(query tiles, num_qo_heads, batch)``. Request ``b`` owns queries ``qo_indptr[b]:qo_indptr[b+1]``
and the keys of its pages (gathered token by token through the page table, as in
`pagoda.kernels.decode`, so any page size and both layouts work). Query ``i`` of a request with
``qo_len`` queries and ``kv_len`` keys sits at key position ``i + kv_len - qo_len`` (the new tokens are
the last ones of the cache: chunked prefill, prefix-cache hits). Key ``j`` is visible iff
``j <= pos + window_right`` (causal: ``window_right = 0``) and ``j >= pos - window_left``.
Online softmax in base 2; the key range
is split, as in `attention_fwd`, into masked edge blocks and fully visible blocks without mask math.
Rows that see no key get zeros and LSE ``-inf``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pagoda.kernels.paged_tile import paged_scores, rope_rows, softmax_pv_update

LOG2E = 1.4426950408889634


@triton.jit
def _paged_block(acc, l_i, m_i, q, K, V, KV_INDICES, p0, kvh, page_size,
                 stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                 q_pos, offs_n, offs_d, partner, start_n, kv_len, window_left, window_right, qk_scale, softcap_log2,
                 slope_log2, rope_rcp_scale, log2_theta,
                 HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr):
    t = start_n + offs_n
    valid = t < kv_len
    s, page, slot, kv_mask = paged_scores(q, K, KV_INDICES, p0, t, valid, offs_d, partner, kvh, page_size, stride_kp,
                                          stride_kt, stride_kh, qk_scale, softcap_log2, rope_rcp_scale, log2_theta,
                                          HEAD_DIM, HAS_SOFTCAP, ROPE, IEEE)
    if HAS_ALIBI:
        dist = q_pos[:, None] - t[None, :]
        dist = tl.where(dist < 0, -dist, dist)
        s = s - slope_log2 * dist.to(tl.float32)
    if MASKED:
        visible = valid[None, :]
        if CAUSAL:
            visible = visible & (t[None, :] <= q_pos[:, None] + window_right)
        if HAS_WINDOW:
            visible = visible & (t[None, :] >= q_pos[:, None] - window_left)
        s = tl.where(visible, s, float("-inf"))
    return softmax_pv_update(acc, l_i, m_i, s, V, page, slot, kv_mask, kvh, stride_vp, stride_vt, stride_vh, offs_d,
                             IEEE)


@triton.jit
def _prefill_paged_kernel(
    Q, K, V, QO_INDPTR, KV_INDPTR, KV_INDICES, KV_LAST, SLOPES, O, LSE,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_sb,
    page_size, group_size, qk_scale, softcap_log2, window_left, window_right, rope_rcp_scale, log2_theta,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    ROPE: tl.constexpr, IEEE: tl.constexpr,
):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest tiles first under a causal mask
    head = tl.program_id(1)
    b = tl.program_id(2)
    kvh = head // group_size
    q_start = tl.load(QO_INDPTR + b)
    qo_len = tl.load(QO_INDPTR + b + 1) - q_start
    m0 = start_m * BLOCK_M
    if m0 >= qo_len:
        return
    p0 = tl.load(KV_INDPTR + b)
    n_pages = tl.load(KV_INDPTR + b + 1) - p0
    kv_len = tl.where(n_pages > 0, (n_pages - 1) * page_size + tl.load(KV_LAST + b), 0)
    shift = kv_len - qo_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_pos = offs_m + shift
    row_mask = offs_m < qo_len
    q_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_ptrs = Q + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
    partner = offs_d
    if ROPE:
        partner = tl.where(offs_d < HEAD_DIM // 2, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
        q2 = tl.load(q_ptrs + partner[None, :], mask=q_mask, other=0.0)
        q = rope_rows(q, q2, q_pos, offs_d, rope_rcp_scale, log2_theta, HEAD_DIM).to(Q.dtype.element_ty)
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(SLOPES + b * stride_sb + head) * 1.4426950408889634

    # Keys any row of the tile may see: [lo, hi); keys every row sees: [full_lo, full_hi).
    lo = kv_len * 0
    hi = kv_len
    full_lo = kv_len * 0
    full_hi = (kv_len // BLOCK_N) * BLOCK_N
    if CAUSAL:  # (or any right window bound)
        hi = tl.minimum(hi, m0 + BLOCK_M + shift + window_right)
        full_hi = tl.minimum(full_hi, (tl.maximum(m0 + shift + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:
        lo = (tl.maximum(m0 + shift - window_left, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + shift - window_left, 0), BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    seg1 = tl.minimum(tl.maximum(full_lo, lo), hi)
    seg2 = tl.maximum(tl.minimum(full_hi, hi), seg1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for start_n in range(lo, seg1, BLOCK_N):
        acc, l_i, m_i = _paged_block(acc, l_i, m_i, q, K, V, KV_INDICES, p0, kvh, page_size, stride_kp, stride_kt,
                                     stride_kh, stride_vp, stride_vt, stride_vh, q_pos, offs_n, offs_d, partner,
                                     start_n, kv_len, window_left, window_right, qk_scale, softcap_log2, slope_log2,
                                     rope_rcp_scale, log2_theta, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                     HAS_ALIBI, ROPE, IEEE)
    for start_n in range(seg1, seg2, BLOCK_N):
        acc, l_i, m_i = _paged_block(acc, l_i, m_i, q, K, V, KV_INDICES, p0, kvh, page_size, stride_kp, stride_kt,
                                     stride_kh, stride_vp, stride_vt, stride_vh, q_pos, offs_n, offs_d, partner,
                                     start_n, kv_len, window_left, window_right, qk_scale, softcap_log2, slope_log2,
                                     rope_rcp_scale, log2_theta, HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                     HAS_ALIBI, ROPE, IEEE)
    for start_n in range(seg2, hi, BLOCK_N):
        acc, l_i, m_i = _paged_block(acc, l_i, m_i, q, K, V, KV_INDICES, p0, kvh, page_size, stride_kp, stride_kt,
                                     stride_kh, stride_vp, stride_vt, stride_vh, q_pos, offs_n, offs_d, partner,
                                     start_n, kv_len, window_left, window_right, qk_scale, softcap_log2, slope_log2,
                                     rope_rcp_scale, log2_theta, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                     HAS_ALIBI, ROPE, IEEE)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = O + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_mask)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + (q_start + offs_m).to(tl.int64) * stride_lt + head, lse, mask=row_mask)


def default_config(head_dim: int) -> dict:
    if head_dim <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}


def prefill_paged_fwd(q, k_cache, v_cache, k_strides, v_strides, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                      page_size: int, num_kv_heads: int, max_qo_len: int, out, lse, *, sm_scale: float, causal: bool,
                      window_left: int = -1, logits_soft_cap: float = 0.0, alibi_slopes=None, rope=None,
                      window_right: int | None = None, config: dict | None = None) -> None:
    """Launch; arguments validated by the ops layer. q/out ``[nnz_qo, Hq, D]`` (last dim contiguous),
    lse float32 ``[nnz_qo, Hq]``; caches 4-D with ``(page, token, head)`` strides; ``rope`` None or
    ``(rope_scale, rope_theta)``; alibi_slopes float32 ``[Hq]`` or ``[batch, Hq]``. ``window_right``
    (keys right of the diagonal, -1 = unbounded) defaults to 0 with causal and -1 without.

    A request's KV length is ``(pages - 1) * page_size + kv_last_page_len``; callers that describe a
    cache by equal-width page rows (block tables) may pass a ``kv_last_page_len`` below 1 so that the
    formula gives the true length."""
    batch = qo_indptr.shape[0] - 1
    hq, dim = q.shape[1], q.shape[2]
    if batch == 0 or max_qo_len == 0 or q.shape[0] == 0:
        return
    cfg = config or default_config(dim)
    if softcap := float(logits_soft_cap):
        qk_scale, softcap_log2 = sm_scale / softcap, softcap * LOG2E
    else:
        qk_scale, softcap_log2 = sm_scale * LOG2E, 0.0
    rope_rcp_scale, log2_theta = (1.0, 0.0) if rope is None else (1.0 / rope[0], math.log2(rope[1]))
    if window_right is None:
        window_right = 0 if causal else -1
    grid = (triton.cdiv(max_qo_len, cfg["BLOCK_M"]), hq, batch)
    stride_sb = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    _prefill_paged_kernel[grid](
        q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
        alibi_slopes if alibi_slopes is not None else q, out, lse,
        q.stride(0), q.stride(1), *k_strides, *v_strides, out.stride(0), out.stride(1), lse.stride(0), stride_sb,
        page_size, hq // num_kv_heads, qk_scale, softcap_log2, window_left, window_right, rope_rcp_scale,
        log2_theta,
        HEAD_DIM=dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(dim)), BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], CAUSAL=window_right >= 0, HAS_WINDOW=window_left >= 0, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None, ROPE=rope is not None, IEEE=q.dtype == torch.float32,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )

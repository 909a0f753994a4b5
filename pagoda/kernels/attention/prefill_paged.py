"""FlashAttention-2-structured prefill/append attention: ragged queries against a paged KV cache.

Grid ``(query-row tiles x splits, num_kv_heads, batch)``. Request ``b`` owns queries
``qo_indptr[b]:qo_indptr[b+1]`` and the keys of its pages, gathered token by token through the page
table (key ``t`` is slot ``t % page_size`` of page ``kv_indices[kv_indptr[b] + t // page_size]``), so any
page size and both layouts work.

GQA packing: a program owns one KV head and ``BLOCK_M`` rows of the request's ``qo_len * GROUP`` rows,
row ``r`` being (query ``r // GROUP``, query head ``kvh * GROUP + r % GROUP``), so each K/V tile is
loaded once for every query head that shares it and a decode-like request (one query) still fills
the rows of a tensor-core tile with its heads.

Positions: query ``i`` of a request with ``qo_len`` queries and ``kv_len`` keys sits at key position
``i + kv_len - qo_len`` (the new tokens are the last ones of the cache: chunked prefill, prefix-cache
hits). Key ``j`` is visible iff ``j <= pos + window_right`` (causal: ``window_right = 0``) and
``j >= pos - window_left``. Online softmax in base 2 (`attention_fwd`); a tile's key range is cut into
masked edge blocks and fully visible blocks without mask math. Rows that see no key get zeros, LSE -inf.

Split-KV (``SPLIT``): program ``(tile, s)`` intersects its rows' key range with chunk
``[s * chunk, (s + 1) * chunk)`` (``chunk`` read from device memory, a multiple of ``BLOCK_N``, so a
captured CUDA graph replays for any lengths) and writes the chunk's normalised float32 output and
base-2 LSE to the workspace; a chunk its rows cannot see leaves the empty state (o = 0, lse = -inf).
`_merge_splits_kernel` then combines the ``num_splits`` states of each row exactly:
``out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)``, ``lse = (M + log2 sum_s 2^(lse_s - M)) ln 2``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pagoda.kernels._common import ALIBI_SIGNED, LN2_JIT, LOG2E, LOG2E_JIT, alibi_mode, online_softmax, soft_cap
from pagoda.kernels.attention.mask_tile import custom_mask_bits
from pagoda.kernels.attention.paged_tile import addr_flags, load_rows, paged_offsets, rope_rows
from pagoda.kernels.launch.fast import cdiv, launch, launch_tuned, next_pow2

SPLIT_ALIGN = 128  # split chunks are multiples of this, which every config's BLOCK_N divides


@triton.jit
def _paged_block(acc, l_i, m_i, q, K_H, V_H, KV_INDICES, p0, page_size, page_shift, stride_kp, stride_kt, stride_vp,
                 stride_vt, q_pos, slope_log2, offs_n, offs_d, partner, start_n, kv_len, window_left, window_right,
                 qk_scale, softcap_log2, rope_rcp_scale, log2_theta, MASK_WORDS, mask_row, row_mask,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, ROPE: tl.constexpr,
                 IEEE: tl.constexpr, ADDR: tl.constexpr, CUSTOM_MASK: tl.constexpr = False):
    """One ``BLOCK_N`` tile of keys ``start_n + offs_n``: the updated online-softmax state (acc, l_i, m_i).
    Without MASKED every key of the tile exists and every row sees it (no bounds or mask math).
    ``ADDR`` bits (see `addr_flags`) trim the gather's integer work, which the hot loop pays per key.
    CUSTOM_MASK (with MASKED): a key is visible iff its bit in the rows' mask words (`custom_mask_bits`) is set."""
    t = start_n + offs_n
    valid = t < kv_len
    off_k, off_v = paged_offsets(KV_INDICES, p0, t, valid, page_size, page_shift, stride_kp, stride_kt, stride_vp,
                                 stride_vt, MASKED, ADDR)
    k = load_rows(K_H, off_k, offs_d, valid, MASKED, HEAD_DIM, HEAD_DIM_PAD)
    if ROPE:
        kp = tl.load(K_H + off_k[:, None] + partner[None, :], mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM),
                     other=0.0)
        k = rope_rows(k, kp, t, offs_d, rope_rcp_scale, log2_theta, HEAD_DIM).to(K_H.dtype.element_ty)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if HAS_SOFTCAP or HAS_ALIBI:
        if HAS_SOFTCAP:
            s = soft_cap(qk, qk_scale, softcap_log2)
        else:
            s = qk * qk_scale
        if HAS_ALIBI == ALIBI_SIGNED:   # FlashInfer's bias: slope * (key - query position), signed
            s = s + slope_log2[:, None] * (t[None, :] - q_pos[:, None]).to(tl.float32)
        elif HAS_ALIBI:                 # flash-attn's: -slope * |query position - key|
            dist = q_pos[:, None] - t[None, :]
            s = s - slope_log2[:, None] * tl.where(dist < 0, -dist, dist).to(tl.float32)
        scale = 1.0
    else:
        # Raw products, scaled inside the exponent (one FMA per score); max commutes with scale > 0.
        s = qk
        scale = qk_scale
    if CUSTOM_MASK:
        s = tl.where(custom_mask_bits(MASK_WORDS, mask_row, row_mask, start_n, offs_n), s, float("-inf"))
    elif MASKED:
        visible = valid[None, :]
        if CAUSAL:
            visible = visible & (t[None, :] <= q_pos[:, None] + window_right)
        if HAS_WINDOW:
            visible = visible & (t[None, :] >= q_pos[:, None] - window_left)
        s = tl.where(visible, s, float("-inf"))
    p, alpha, m_new, l_i = online_softmax(s, m_i, l_i, scale, MASKED)
    v = load_rows(V_H, off_v, offs_d, valid, MASKED, HEAD_DIM, HEAD_DIM_PAD)
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _prefill_paged_kernel(
    Q, K, V, QO_INDPTR, KV_INDPTR, KV_INDICES, KV_LAST, SLOPES, CHUNK, O, LSE, MASK_WORDS, MASK_META, TILE_INDPTR,
    TILE_LIST, stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_ot, stride_os, stride_oh, stride_lt, stride_ls, stride_lh, stride_sb,
    page_size, page_shift, num_splits, qk_scale, softcap_log2, window_left, window_right, rope_rcp_scale, log2_theta,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr,
    ADDR: tl.constexpr, CUSTOM_MASK: tl.constexpr = False,
):
    pid = tl.program_id(0)
    split = pid % num_splits
    start_m = tl.num_programs(0) // num_splits - 1 - pid // num_splits  # heaviest tiles first (causal)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(QO_INDPTR + b)
    qo_len = tl.load(QO_INDPTR + b + 1) - q_start
    m0 = start_m * BLOCK_M
    if m0 >= qo_len * GROUP:
        return
    p0 = tl.load(KV_INDPTR + b)
    n_pages = tl.load(KV_INDPTR + b + 1) - p0
    kv_len = tl.where(n_pages > 0, (n_pages - 1) * page_size + tl.load(KV_LAST + b), 0)
    shift = kv_len - qo_len

    offs_r = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    tok = offs_r // GROUP
    head = (kvh * GROUP + offs_r % GROUP).to(tl.int64)     # 64-bit: q/out may be head-major views (HF layout)
    q_pos = tok + shift
    row_mask = tok < qo_len
    q_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_ptrs = Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
    partner = offs_d
    if ROPE:
        partner = tl.where(offs_d < HEAD_DIM // 2, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
        q2 = tl.load(q_ptrs + partner[None, :], mask=q_mask, other=0.0)
        q = rope_rows(q, q2, q_pos, offs_d, rope_rcp_scale, log2_theta, HEAD_DIM).to(Q.dtype.element_ty)
    slope_log2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope_log2 = tl.load(SLOPES + b * stride_sb + head, mask=row_mask, other=0.0) * LOG2E_JIT

    # Keys any row of the tile may see: [lo, hi); keys every row sees: [full_lo, full_hi). The rows hold
    # queries tok_lo..tok_hi (later rows of the tile are padding).
    tok_lo = m0 // GROUP
    tok_hi = tl.minimum((m0 + BLOCK_M - 1) // GROUP, qo_len - 1)
    lo = kv_len * 0
    hi = kv_len
    full_lo = kv_len * 0
    full_hi = (kv_len // BLOCK_N) * BLOCK_N
    if CAUSAL:  # (or any right window bound)
        hi = tl.minimum(hi, tok_hi + shift + window_right + 1)
        full_hi = tl.minimum(full_hi, (tl.maximum(tok_lo + shift + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:
        lo = (tl.maximum(tok_lo + shift - window_left, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(tok_hi + shift - window_left, 0), BLOCK_N) * BLOCK_N
    if SPLIT:  # this program's chunk (BLOCK_N-aligned, so the segments below stay aligned)
        chunk = tl.load(CHUNK)
        lo = tl.maximum(lo, split * chunk)
        hi = tl.minimum(hi, split * chunk + chunk)
    hi = tl.maximum(hi, lo)
    seg1 = tl.minimum(tl.maximum(full_lo, lo), hi)
    seg2 = tl.maximum(tl.minimum(full_hi, hi), seg1)

    K_H = K + kvh.to(tl.int64) * stride_kh
    V_H = V + kvh.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if CUSTOM_MASK:
        # Custom mask: walk only the key tiles listed for this query tile (plan: `pagoda.ops._mask`); the mask
        # bits already hold the window and the key bounds, so no causal / window arithmetic here.
        q_tile = tl.load(MASK_META + b * 3 + 2) + start_m
        mask_row = tl.load(MASK_META + b * 3).to(tl.int64) + tok.to(tl.int64) * tl.load(MASK_META + b * 3 + 1)
        for it in range(tl.load(TILE_INDPTR + q_tile), tl.load(TILE_INDPTR + q_tile + 1)):
            start_n = tl.load(TILE_LIST + it) * BLOCK_N
            acc, l_i, m_i = _paged_block(acc, l_i, m_i, q, K_H, V_H, KV_INDICES, p0, page_size, page_shift,
                                         stride_kp, stride_kt, stride_vp, stride_vt, q_pos, slope_log2, offs_n,
                                         offs_d, partner, start_n, kv_len, window_left, window_right, qk_scale,
                                         softcap_log2, rope_rcp_scale, log2_theta, MASK_WORDS, mask_row, row_mask,
                                         HEAD_DIM, HEAD_DIM_PAD, True, False, False, HAS_SOFTCAP, HAS_ALIBI, ROPE,
                                         IEEE, ADDR, True)
    else:
        for start_n in range(lo, seg1, BLOCK_N):
            acc, l_i, m_i = _paged_block(acc, l_i, m_i, q, K_H, V_H, KV_INDICES, p0, page_size, page_shift,
                                         stride_kp, stride_kt, stride_vp, stride_vt, q_pos, slope_log2, offs_n,
                                         offs_d, partner, start_n, kv_len, window_left, window_right, qk_scale,
                                         softcap_log2, rope_rcp_scale, log2_theta, MASK_WORDS, offs_r, row_mask,
                                         HEAD_DIM,
                                         HEAD_DIM_PAD, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, ROPE, IEEE,
                                         ADDR)
        for start_n in range(seg1, seg2, BLOCK_N):
            acc, l_i, m_i = _paged_block(acc, l_i, m_i, q, K_H, V_H, KV_INDICES, p0, page_size, page_shift,
                                         stride_kp, stride_kt, stride_vp, stride_vt, q_pos, slope_log2, offs_n,
                                         offs_d, partner, start_n, kv_len, window_left, window_right, qk_scale,
                                         softcap_log2, rope_rcp_scale, log2_theta, MASK_WORDS, offs_r, row_mask,
                                         HEAD_DIM,
                                         HEAD_DIM_PAD, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, ROPE, IEEE,
                                         ADDR)
        for start_n in range(seg2, hi, BLOCK_N):
            acc, l_i, m_i = _paged_block(acc, l_i, m_i, q, K_H, V_H, KV_INDICES, p0, page_size, page_shift,
                                         stride_kp, stride_kt, stride_vp, stride_vt, q_pos, slope_log2, offs_n,
                                         offs_d, partner, start_n, kv_len, window_left, window_right, qk_scale,
                                         softcap_log2, rope_rcp_scale, log2_theta, MASK_WORDS, offs_r, row_mask,
                                         HEAD_DIM,
                                         HEAD_DIM_PAD, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, ROPE, IEEE,
                                         ADDR)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    rows = (q_start + tok).to(tl.int64)
    o_ptrs = O + rows[:, None] * stride_ot + split * stride_os + head[:, None] * stride_oh + offs_d[None, :]
    l_ptrs = LSE + rows * stride_lt + split * stride_ls + head * stride_lh
    if SPLIT:  # float32 partial state, LSE in base 2
        tl.store(o_ptrs, out, mask=q_mask)
        tl.store(l_ptrs, lse2, mask=row_mask)
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_mask)
        tl.store(l_ptrs, lse2 * LN2_JIT, mask=row_mask)


@triton.jit
def _merge_splits_kernel(O_PART, LSE_PART, QO_INDPTR, O, LSE, n_req, num_splits,
                         stride_pt, stride_ps, stride_ph, stride_lpt, stride_lps, stride_lph,
                         stride_ot, stride_oh, stride_lt, stride_lh,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """Grid ``(rows, num_qo_heads)``: merge one row's split states; rows past ``qo_indptr[-1]`` are left as
    they are (the caller zero-fills padding)."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    if row >= tl.load(QO_INDPTR + n_req):
        return
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    smask = offs_s < num_splits
    r64 = row.to(tl.int64)
    lse = tl.load(LSE_PART + r64 * stride_lpt + offs_s * stride_lps + h * stride_lph, mask=smask,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    o = tl.load(O_PART + r64 * stride_pt + offs_s[:, None] * stride_ps + h * stride_ph + offs_d[None, :],
                mask=smask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    l_sum = tl.sum(w, 0)
    empty = l_sum == 0.0
    out = tl.sum(w[:, None] * o, 0) / tl.where(empty, 1.0, l_sum)
    tl.store(O + r64 * stride_ot + h.to(tl.int64) * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    lse_out = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l_sum))) * LN2_JIT)
    tl.store(LSE + r64 * stride_lt + h * stride_lh, lse_out)


def choose_block_m(rows: int, head_dim: int, fp32: bool = False) -> int:
    """Rows per tile from the most rows (``qo_len * group``) a request has: 16 for decode-like requests,
    128 for long ones (64 where a 128-row fp32 or head_dim > 128 tile would not fit)."""
    if rows <= 16:
        return 16
    if rows <= 64 or head_dim > 128 or fp32:
        return 64
    return 128


def default_config(head_dim: int, block_m: int, fp32: bool = False) -> dict:
    """(BLOCK_N, num_warps, num_stages) that fit in shared memory on every GPU, without tuning."""
    if head_dim > 128:
        return {"BLOCK_N": 32, "num_warps": 4 if block_m <= 16 else 8, "num_stages": 1 if fp32 else 2}
    if block_m <= 16:
        return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2 if fp32 else 3}
    if block_m >= 128:
        return {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


# Autotuned (BLOCK_N, num_warps, num_stages) per BLOCK_M class. 128 x 64 tiles, 8 warps, 3 stages is what
# the dense kernel picks on an H200 at head_dim 128.
_TILES = {
    16: [(64, 4, 3), (128, 4, 3), (64, 4, 4), (32, 4, 3), (128, 8, 3)],
    64: [(64, 4, 3), (64, 4, 2), (128, 4, 3), (32, 4, 3), (64, 8, 3)],
    128: [(64, 8, 3), (128, 8, 3), (64, 8, 4), (64, 8, 2), (32, 8, 3)],
}
assert all(SPLIT_ALIGN % bn == 0 for tiles in _TILES.values() for bn, _, _ in tiles)


def _prune(configs, named_args, **kwargs):
    d, bm, fp32 = (kwargs.get(k, named_args.get(k)) for k in ("HEAD_DIM_PAD", "BLOCK_M", "IEEE"))
    wanted = set(_TILES[bm])
    kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted
            and not (d > 128 and (bm * c.kwargs["BLOCK_N"] > 64 * 64 or c.num_stages > 2))
            and not (fp32 and c.num_stages > 2)]
    if not kept:
        cfg = default_config(d, bm, fp32)
        kept = [triton.Config({"BLOCK_N": cfg["BLOCK_N"]}, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])]
    return kept


_prefill_paged_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
             for bn, w, st in sorted({t for tiles in _TILES.values() for t in tiles})],
    key=["HEAD_DIM_PAD", "GROUP", "BLOCK_M", "SPLIT", "CAUSAL", "HAS_WINDOW"],
    prune_configs_by={"early_config_prune": _prune},
)(_prefill_paged_kernel)


def prefill_paged_fwd(q, k_cache, v_cache, k_strides, v_strides, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                      page_size: int, num_kv_heads: int, max_qo_len: int, out, lse, *, sm_scale: float, causal: bool,
                      window_left: int = -1, logits_soft_cap: float = 0.0, alibi_slopes=None, rope=None,
                      window_right: int | None = None, config: dict | None = None, block_m: int | None = None,
                      num_splits: int = 0, chunk=None, o_part=None, lse_part=None, custom_mask=None,
                      alibi_signed: bool = False) -> None:
    """Launch; arguments validated by the ops layer. q/out ``[nnz_qo, Hq, D]`` (last dim contiguous),
    lse float32 ``[nnz_qo, Hq]``; caches 4-D with ``(page, token, head)`` strides; ``rope`` None or
    ``(rope_scale, rope_theta)``; alibi_slopes float32 ``[Hq]`` or ``[batch, Hq]``, the bias flash-attn's
    ``-slope * |pos - j|`` or, with ``alibi_signed``, FlashInfer's ``slope * (j - pos)``. ``window_right``
    (keys right of the diagonal, -1 = unbounded) defaults to 0 with causal and -1 without.
    ``max_qo_len`` bounds every request's queries (the grid covers ``max_qo_len * Hq / Hk`` rows).

    A request's KV length is ``(pages - 1) * page_size + kv_last_page_len``; callers that describe a
    cache by equal-width page rows (block tables) may pass a ``kv_last_page_len`` below 1 so that the
    formula gives the true length.

    ``block_m`` fixes the rows per tile (default `choose_block_m`); ``config`` fixes BLOCK_N/num_warps/
    num_stages (and BLOCK_M) as `default_config` gives them, None runs the autotuned kernel. Which kernel serves
    a call (this one or the Gluon sm_90 one), and with which configuration, is decided in `pagoda.ops._dispatch`.
    Split-KV with ``num_splits > 0``: ``chunk`` is an int32 ``[1]`` device tensor (keys per split, a multiple of
    BLOCK_N: of `SPLIT_ALIGN` for the tuned kernel) with
    ``num_splits * chunk >= `` every kv_len, and ``o_part [>= nnz_qo, num_splits, Hq, D]`` /
    ``lse_part [>= nnz_qo, num_splits, Hq]`` float32 workspace views; rows below ``qo_indptr[-1]`` of
    out/lse are then written by the merge.

    ``custom_mask``: a planned mask (`pagoda.ops._mask.MaskPlan`: ``words``, ``meta``, ``tile_indptr``,
    ``tile_list`` and the launch ``config`` its tile lists were built for). The kernel then walks only the listed
    key tiles and applies the mask bits (which hold the window); ``causal``/``window_*`` and ``config`` are
    ignored, and split-KV is not used."""
    batch = qo_indptr.shape[0] - 1
    hq, dim = q.shape[1], q.shape[2]
    if batch == 0 or max_qo_len == 0 or q.shape[0] == 0:
        return
    if window_right is None:
        window_right = 0 if causal else -1
    group = hq // num_kv_heads
    fp32 = q.dtype == torch.float32
    if custom_mask is not None:
        config, window_left, window_right, num_splits = custom_mask.config, -1, -1, 0
    bm = (config or {}).get("BLOCK_M") or block_m or choose_block_m(max_qo_len * group, dim, fp32)
    if softcap := float(logits_soft_cap):
        qk_scale, softcap_log2 = sm_scale / softcap, softcap * LOG2E
    else:
        qk_scale, softcap_log2 = sm_scale * LOG2E, 0.0
    rope_rcp_scale, log2_theta = (1.0, 0.0) if rope is None else (1.0 / rope[0], math.log2(rope[1]))
    split = num_splits > 0
    if split:
        dst_o, dst_l = o_part, lse_part
        so, sl = o_part.stride()[:3], lse_part.stride()
    else:
        dst_o, dst_l = out, lse
        so, sl = (out.stride(0), 0, out.stride(1)), (lse.stride(0), 0, lse.stride(1))
    grid = (cdiv(max_qo_len * group, bm) * max(num_splits, 1), num_kv_heads, batch)
    stride_sb = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    args = (q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
            alibi_slopes if alibi_slopes is not None else q, chunk if split else qo_indptr, dst_o, dst_l,
            *((custom_mask.words, custom_mask.meta, custom_mask.tile_indptr, custom_mask.tile_list)
              if custom_mask is not None else (qo_indptr,) * 4),
            q.stride(0), q.stride(1), *k_strides, *v_strides, *so, *sl, stride_sb,
            page_size, page_size.bit_length() - 1, max(num_splits, 1), qk_scale, softcap_log2, window_left,
            window_right, rope_rcp_scale, log2_theta)
    meta = dict(HEAD_DIM=dim, HEAD_DIM_PAD=max(16, next_pow2(dim)), GROUP=group, BLOCK_M=bm, SPLIT=split,
                CAUSAL=window_right >= 0, HAS_WINDOW=window_left >= 0, HAS_SOFTCAP=softcap > 0,
                HAS_ALIBI=alibi_mode(alibi_slopes, alibi_signed), ROPE=rope is not None, IEEE=fp32,
                ADDR=addr_flags(page_size, k_strides, v_strides))
    if custom_mask is not None:
        meta["CUSTOM_MASK"] = True
    if config is not None:
        launch(_prefill_paged_kernel, grid, *args, **meta, BLOCK_N=config["BLOCK_N"],
               num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
    else:
        launch_tuned(_prefill_paged_tuned, _prefill_paged_kernel, grid, *args, **meta)
    if split:
        launch(_merge_splits_kernel, (out.shape[0], hq), o_part, lse_part, qo_indptr, out, lse, batch, num_splits,
               *o_part.stride()[:3], *lse_part.stride(), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
               HEAD_DIM=dim, HEAD_DIM_PAD=meta["HEAD_DIM_PAD"], SPLITS_PAD=max(2, next_pow2(num_splits)),
               num_warps=4 if dim * num_splits <= 8192 else 8)

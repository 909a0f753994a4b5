"""FlashAttention-2-structured forward kernel for dense and ragged (varlen) batches.

One program computes a ``BLOCK_M`` tile of queries for one (batch, query head) and streams the keys
of that sequence in ``BLOCK_N`` tiles through an online softmax held in registers:

    m_new = max(m, rowmax(s));  alpha = 2^(m - m_new);  p = 2^(s - m_new)
    l = l * alpha + rowsum(p);  acc = acc * alpha + p @ V;  m = m_new
    out = acc / l;              lse = (m + log2 l) * ln 2

Scores are kept in base 2 (the softmax scale is pre-multiplied by log2 e) so each exponential is
one ``ex2`` instruction. No ``seqlen_q x seqlen_k`` matrix ever exists outside registers.

The key range of a query tile is split into at most three segments: masked blocks at the left edge
of a sliding window, blocks that every query of the tile fully sees (no mask arithmetic at all: the
hot loop), and masked blocks at the causal/right-window diagonal and the ragged end of the keys.

Positions follow flash-attn 2: query ``i`` sits at key position ``i + seqlen_k - seqlen_q``; key
``j`` is visible iff ``i + shift - left <= j <= i + shift + right`` (a bound < 0 is unbounded).
A query row that sees no key yields zeros and LSE ``-inf``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagoda.kernels._common import ALIBI_SIGNED, LN2_JIT, LOG2E, LOG2E_JIT, alibi_mode, online_softmax, soft_cap
from pagoda.kernels.launch.fast import cdiv, launch, launch_tuned, next_pow2


@triton.jit
def _load_kv_tile(base, desc, stride_t, cols, offs_d, start_n, seqlen_k,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr,
                  USE_TMA: tl.constexpr):
    """``[BLOCK_N, HEAD_DIM_PAD]`` tile of K or V starting at key ``start_n``; rows >= seqlen_k read as 0."""
    if USE_TMA:
        # The descriptor spans exactly this sequence's keys, so the copy engine zero-fills the tail.
        tile = desc.load([start_n, 0])
    else:
        ptrs = base + cols[:, None].to(tl.int64) * stride_t + offs_d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=(cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif HEAD_DIM != HEAD_DIM_PAD:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _attn_fwd_block(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kt, stride_vt,
                    offs_m, offs_n, offs_d, start_n, seqlen_k, shift, window_left, window_right,
                    qk_scale, softcap_log2, slope_log2,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, USE_TMA: tl.constexpr):
    """One BLOCK_N tile of keys: returns the updated online-softmax state (acc, l_i, m_i)."""
    cols = start_n + offs_n
    k = _load_kv_tile(k_base, k_desc, stride_kt, cols, offs_d, start_n, seqlen_k, HEAD_DIM, HEAD_DIM_PAD,
                      MASKED, USE_TMA)
    qk = tl.dot(q, tl.trans(k))
    if HAS_SOFTCAP or HAS_ALIBI:
        # General path: scores in base 2, then the usual max / exp2.
        if HAS_SOFTCAP:
            s = soft_cap(qk, qk_scale, softcap_log2)
        else:
            s = qk * qk_scale
        if HAS_ALIBI == ALIBI_SIGNED:   # FlashInfer's bias: slope * (key - query position), signed
            s = s + slope_log2 * (cols[None, :] - (offs_m[:, None] + shift)).to(tl.float32)
        elif HAS_ALIBI:                 # flash-attn's: -slope * |query position - key|
            dist = (offs_m[:, None] + shift) - cols[None, :]
            dist = tl.where(dist < 0, -dist, dist)
            s = s - slope_log2 * dist.to(tl.float32)
        scale = 1.0
    else:
        # Fast path: max over the raw products, then one FMA per score (qk * scale - m) before ex2.
        # Valid because scale > 0 (checked by the ops layer), so max commutes with the scaling.
        s = qk
        scale = qk_scale
    if MASKED:
        visible = cols[None, :] < seqlen_k
        if HAS_RIGHT:
            visible = visible & (cols[None, :] <= offs_m[:, None] + shift + window_right)
        if HAS_LEFT:
            visible = visible & (cols[None, :] >= offs_m[:, None] + shift - window_left)
        s = tl.where(visible, s, float("-inf"))
    p, alpha, m_new, l_i = online_softmax(s, m_i, l_i, scale, MASKED)
    acc = acc * alpha[:, None]
    v = _load_kv_tile(v_base, v_desc, stride_vt, cols, offs_d, start_n, seqlen_k, HEAD_DIM, HEAD_DIM_PAD,
                      MASKED, USE_TMA)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SLOPES, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_lt,
    stride_sb,
    seqlen_q, seqlen_k, group_size,
    qk_scale, softcap_log2, window_left, window_right,
    seqlen_bucket,  # autotune key only: next power of two of max_seqlen_q
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, WRITE_LSE: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    # Grid: (query tiles, query heads, batch). Tiles go heaviest-first (most keys under a causal mask).
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // group_size

    if IS_VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + batch)
        seqlen_q = tl.load(CU_SEQLENS_Q + batch + 1) - q_start
        k_start = tl.load(CU_SEQLENS_K + batch)
        seqlen_k = tl.load(CU_SEQLENS_K + batch + 1) - k_start
        q_off = q_start.to(tl.int64) * stride_qt
        k_off = k_start.to(tl.int64) * stride_kt
        v_off = k_start.to(tl.int64) * stride_vt
        o_off = q_start.to(tl.int64) * stride_ot
        l_off = q_start.to(tl.int64) * stride_lt
    else:
        q_off = batch.to(tl.int64) * stride_qb
        k_off = batch.to(tl.int64) * stride_kb
        v_off = batch.to(tl.int64) * stride_vb
        o_off = batch.to(tl.int64) * stride_ob
        l_off = batch.to(tl.int64) * stride_lb
    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    shift = seqlen_k - seqlen_q

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    # 64-bit head offsets: a [b, h, s, d] view (HF's layout transposed) has a head stride of s * d elements.
    q_base = Q + q_off + head.to(tl.int64) * stride_qh
    k_base = K + k_off + kv_head.to(tl.int64) * stride_kh
    v_base = V + v_off + kv_head.to(tl.int64) * stride_vh
    o_base = O + o_off + head.to(tl.int64) * stride_oh
    q_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    k_desc = None
    v_desc = None
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[tl.maximum(seqlen_k, 1), HEAD_DIM], strides=[stride_kt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM_PAD])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[tl.maximum(seqlen_k, 1), HEAD_DIM], strides=[stride_vt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM_PAD])
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)

    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(SLOPES + batch * stride_sb + head).to(tl.float32) * LOG2E_JIT

    # Key range [lo, hi) seen by any query of the tile, and the fully visible sub-range [full_lo, full_hi).
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, m0 + BLOCK_M + shift + window_right)
        full_hi = tl.minimum(full_hi, ((m0 + shift + window_right + 1) // BLOCK_N) * BLOCK_N)
    if HAS_LEFT:
        lo = tl.maximum(0, ((m0 + shift - window_left) // BLOCK_N) * BLOCK_N)
        full_lo = tl.cdiv(m0 + BLOCK_M - 1 + shift - window_left, BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    seg1 = tl.minimum(tl.maximum(full_lo, lo), hi)
    seg2 = tl.maximum(tl.minimum(full_hi, hi), seg1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    for start_n in range(lo, seg1, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kt, stride_vt,
                                        offs_m, offs_n, offs_d, start_n, seqlen_k, shift, window_left,
                                        window_right, qk_scale, softcap_log2, slope_log2,
                                        HEAD_DIM, HEAD_DIM_PAD, True, HAS_LEFT, HAS_RIGHT,
                                        HAS_SOFTCAP, HAS_ALIBI, USE_TMA)
    for start_n in range(seg1, seg2, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kt, stride_vt,
                                        offs_m, offs_n, offs_d, start_n, seqlen_k, shift, window_left,
                                        window_right, qk_scale, softcap_log2, slope_log2,
                                        HEAD_DIM, HEAD_DIM_PAD, False, HAS_LEFT, HAS_RIGHT,
                                        HAS_SOFTCAP, HAS_ALIBI, USE_TMA)
    for start_n in range(seg2, hi, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kt, stride_vt,
                                        offs_m, offs_n, offs_d, start_n, seqlen_k, shift, window_left,
                                        window_right, qk_scale, softcap_log2, slope_log2,
                                        HEAD_DIM, HEAD_DIM_PAD, True, HAS_LEFT, HAS_RIGHT,
                                        HAS_SOFTCAP, HAS_ALIBI, USE_TMA)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=q_mask)
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2_JIT)
        l_base = LSE + l_off + head.to(tl.int64) * stride_lh
        tl.store(l_base + offs_m.to(tl.int64) * stride_lt, lse, mask=offs_m < seqlen_q)


# Launch configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA). Chosen from sweeps of every
# tile on an H200: 128x128 tiles with 8 warps and TMA
# lead at head_dim 128; 128x64 with 8 warps at head_dim 64; 64x64 wins at short causal sequences.
_TILES = [
    (128, 128, 8, 3, True), (128, 128, 8, 3, False), (128, 64, 8, 3, False), (128, 64, 4, 4, True),
    (64, 64, 4, 3, True), (64, 64, 4, 3, False), (64, 128, 4, 3, True), (64, 32, 4, 3, False),
]


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=w, num_stages=st)
            for bm, bn, w, st, tma in _TILES]


_TRITON_HAS_TMA = hasattr(triton, "set_allocator") and hasattr(triton.language, "make_tensor_descriptor")


@functools.cache   # one entry per device, kept for the process
def _sm_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def tma_supported(*tensors: torch.Tensor) -> bool:
    """Device-side tensor descriptors need sm_90+, 16-byte aligned bases and 16-byte row strides.
    (The capability is cached per device: querying it costs ~8 µs of host time per call.)"""
    t0 = tensors[0]
    if not _TRITON_HAS_TMA or not t0.is_cuda or _sm_major(t0.device.index) < 9:
        return False
    for t in tensors:
        if t.data_ptr() % 16 or any((st * t.element_size()) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _prune(configs, named_args, **kwargs):
    d = kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD"))
    tma = tma_supported(named_args["K"], named_args["V"])
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if c.kwargs["USE_TMA"] and not tma:
            continue
        if d >= 256 and (bm * bn > 64 * 64 or c.num_stages > 2):
            continue
        if d > 128 and bm * bn > 64 * 128:
            continue
        if d <= 64 and bn == 32:
            continue
        kept.append(c)
    if not kept:  # head_dim 256: the small-tile pointer configs
        kept = [c for c in configs if not c.kwargs["USE_TMA"] and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        kept = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=2) for c in kept]
    return kept


_attn_fwd_tuned = triton.autotune(
    configs=_configs(),
    key=["HEAD_DIM_PAD", "IS_VARLEN", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI", "seqlen_bucket"],
    prune_configs_by={"early_config_prune": _prune},
)(_attn_fwd_kernel)


def default_config(head_dim: int, tma: bool = False) -> dict:
    """A launch configuration that is correct and reasonable everywhere (no tuning: ``PAGODA_AUTOTUNE=0``)."""
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    if head_dim <= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": tma}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


# Small tiles for the Triton interpreter (tests on the CPU): its cost grows with the tile, not the grid.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor | None, *, cu_seqlens_q: torch.Tensor | None,
                  cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, batch_size: int,
                  softmax_scale: float, window_left: int, window_right: int, softcap: float,
                  alibi_slopes: torch.Tensor | None, config: dict | None = None, alibi_signed: bool = False) -> None:
    """Launch the forward kernel; arguments are assumed validated by `pagoda.ops.attention`.

    ALiBi adds flash-attn's ``-slope * |pos_q - pos_k|``, or FlashInfer's ``slope * (pos_k - pos_q)`` with
    ``alibi_signed`` (the ragged prefill wrapper).

    Dense: q ``[b, sq, hq, d]``, k/v ``[b, sk, hk, d]``, out like q, lse ``[b, hq, sq]`` fp32.
    Varlen (cu_seqlens given): q ``[total_q, hq, d]``, k/v ``[total_k, hk, d]``, lse ``[hq, total_q]``.
    The last dimension of q, k, v, out must be contiguous. ``config`` fixes BLOCK_M/BLOCK_N/num_warps/
    num_stages (and USE_TMA) as `default_config` and `INTERPRETER_CONFIG` give them; None runs the autotuned
    kernel. Which kernel serves a call, and with which configuration, is decided in `pagoda.ops._dispatch`.
    """
    varlen = cu_seqlens_q is not None
    head_dim = q.shape[-1]
    hq, hk = q.shape[-2], k.shape[-2]
    if varlen:
        sq = sk = 0
        qs = (0, q.stride(0), q.stride(1))
        ks = (0, k.stride(0), k.stride(1))
        vs = (0, v.stride(0), v.stride(1))
        os_ = (0, out.stride(0), out.stride(1))
        ls = (0, lse.stride(0), lse.stride(1)) if lse is not None else (0, 0, 0)
    else:
        sq, sk = q.shape[1], k.shape[1]
        qs = (q.stride(0), q.stride(1), q.stride(2))
        ks = (k.stride(0), k.stride(1), k.stride(2))
        vs = (v.stride(0), v.stride(1), v.stride(2))
        os_ = (out.stride(0), out.stride(1), out.stride(2))
        ls = (lse.stride(0), lse.stride(1), lse.stride(2)) if lse is not None else (0, 0, 0)
    if softcap > 0:
        qk_scale = softmax_scale / softcap
        softcap_log2 = softcap * LOG2E
    else:
        qk_scale = softmax_scale * LOG2E
        softcap_log2 = 0.0
    stride_sb = 0
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        stride_sb = alibi_slopes.stride(0)
    dummy = q  # placeholder pointer for absent optional tensors (never dereferenced)
    args = (
        q, k, v, out, lse if lse is not None else dummy, alibi_slopes if alibi_slopes is not None else dummy,
        cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
        *qs, *ks, *vs, *os_, *ls, stride_sb,
        sq, sk, hq // hk, qk_scale, softcap_log2, window_left, window_right,
        next_pow2(max(int(max_seqlen_q), 1)),
    )
    meta = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, next_pow2(head_dim)),
        IS_VARLEN=varlen, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_mode(alibi_slopes, alibi_signed), WRITE_LSE=lse is not None,
    )
    if config is not None:
        bm = config["BLOCK_M"]
        extra = {}
        if config.get("USE_TMA"):
            _ensure_tma_allocator()
            extra["USE_TMA"] = True
        grid = (cdiv(max(int(max_seqlen_q), 1), bm), hq, batch_size)
        launch(_attn_fwd_kernel, grid, *args, **meta, **extra, BLOCK_M=bm, BLOCK_N=config["BLOCK_N"],
               num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
    else:
        tma = tma_supported(k, v)
        if tma:
            _ensure_tma_allocator()

        def grid(m):
            return (cdiv(max(int(max_seqlen_q), 1), m["BLOCK_M"]), hq, batch_size)
        launch_tuned(_attn_fwd_tuned, _attn_fwd_kernel, grid, *args, extra_key=(tma,), **meta)


# Whether torch's allocator is installed as Triton's scratch allocator: set once per process, never cleared.
_TMA_ALLOCATOR_SET = False


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a scratch allocator; install torch's once (process-global)."""
    global _TMA_ALLOCATOR_SET
    if not _TMA_ALLOCATOR_SET:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda")
        triton.set_allocator(alloc)
        _TMA_ALLOCATOR_SET = True

"""Paged-KV prefill on sm_90 in Gluon: the warp-specialised consumers of `ws` fed by a
loader warp that gathers every K/V tile page by page with TMA.

Scope (`paged_supported`): fp16/bf16, head_dim 64 or 128, causal (bottom-right aligned: query i of a
request with qo_len queries and kv_len keys sits at key position ``i + kv_len - qo_len``) or full
attention, no window / softcap / ALiBi / RoPE, page sizes 16, 32, 64 or any multiple of BLOCK_N = 128,
NHD ``[pages, page_size, hk, d]`` or HND ``[pages, hk, page_size, d]`` caches whose token rows are 16-byte
aligned. Everything else keeps the Triton kernel (`prefill_paged`).

One CTA = one BLOCK_M = 128 tile of one request's queries for one query head (grid ``(q tiles, hq,
batch)``, heaviest tiles first; tiles past a request's end exit at once), split over 3 partitions:

    loader       (1 warp)   Q: two ``[64, d]`` TMA boxes over q viewed as ``[nnz, hq * d]`` (rows past the
                            request's end belong to the next one or are zero-filled: they are never stored).
                            Key tile i: the BLOCK_N / BOX page ids of its keys (one vector load, issued a
                            tile ahead), then BOX-row TMA boxes, one per page (BOX = min(page_size, BLOCK_N)),
                            into consecutive row slices of the ring slot; the slot's "ready" mbarrier
                            expects the whole tile's bytes. Pages past the request's last one re-read
                            the last page (their keys are masked).
    consumer w   (4 warps)  `_ws_mainloop` on rows 64w .. 64w + 63 (S = Q K^T, softmax, O += P V, async
                            wgmma overlapping the softmax); the last tile's V rows past kv_len are zeroed
                            in shared memory first (a page's unused slots may hold NaN). O / l -> masked
                            stores into out ``[nnz, hq, d]``; LSE (natural log) -> lse ``[nnz, hq]``.

The cache is viewed as a 2-D tensor of token rows ``[R, C]`` with the token stride as row stride: NHD rows
hold every KV head (``C = hk * d``, head h at column ``h * d``), HND rows one head (``C = d``, head h
``page_size`` rows further). Key t of page p is row ``p * rows_per_page + t % page_size + kvh *
rows_per_head`` at column ``kvh * cols_per_head``. A 128-byte-swizzled NVMMA tile repeats every 8 rows,
so 16-row boxes stack in a slot exactly as one 128-row box would land.
"""
from __future__ import annotations

import functools

import torch

from pagoda import _switches
from pagoda.kernels._common import LN2_JIT, LOG2E
from pagoda.kernels.hopper.configs import WS_MAXNREG
from pagoda.kernels.hopper.gluon import GLUON_OK, is_sm90, smem_layout
from pagoda.kernels.launch.fast import device_of
from pagoda.kernels.launch.tma import tma_launch

# The tile and register plan of the dense two-consumer configs (`configs.WS_CONFIGS`: 2 consumer warpgroups of 64
# rows each, 240 registers per consumer thread under the kernel-wide cap).
BLOCK_M, BLOCK_N, STAGES = 128, 128, 2
CONSUMER_REGS, MAXNREG = 240, WS_MAXNREG[2]
# Loader warp registers (the warp is padded to a warpgroup): 128 x (240 + 240 + 24) <= 64K.
LOADER_REGS = 24

if GLUON_OK:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    from pagoda.kernels.hopper.gluon import key_tiles, nvmma_2d
    from pagoda.kernels.hopper.ws import _ws_mainloop

    _LOADER_REGS = gl.constexpr(LOADER_REGS)
    _IDS_LAYOUT = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))  # a tile's page ids in the loader warp

    @gluon.jit
    def _tile_rows(KV_INDICES, p0, n_pages, i, row_h, page_size, rows_per_page, BLOCK_N: gl.constexpr,
                   BOX: gl.constexpr):
        """Cache rows ``[BLOCK_N // BOX]`` of the boxes of key tile i (page ids past the request's last
        page are clamped to it)."""
        NB: gl.constexpr = BLOCK_N // BOX
        keys = i * BLOCK_N + gl.arange(0, NB, layout=_IDS_LAYOUT) * BOX
        pidx = gl.minimum(keys // page_size, n_pages - 1)
        pages = gl.load(KV_INDICES + p0 + pidx).to(gl.int32)
        return pages * rows_per_page + keys % page_size + row_h

    @gluon.jit
    def _issue_boxes(desc, bufs, bar, slot, rows, col, BLOCK_N: gl.constexpr, BOX: gl.constexpr):
        """One TMA box per page of a key tile into consecutive BOX-row slices of ring slot ``slot``."""
        NB: gl.constexpr = BLOCK_N // BOX
        mbarrier.expect(bar, NB * desc.block_type.nbytes)
        for b in gl.static_range(NB):
            row = gl.sum(gl.where(gl.arange(0, NB, layout=_IDS_LAYOUT) == b, rows, 0), axis=0)
            tma.async_load(desc, [row, col], bar, bufs.index(slot).slice(b * BOX, BOX, dim=0))

    @gluon.jit
    def _paged_loader(q_desc, k_desc, v_desc, KV_INDICES, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready,
                      v_empty, q_start, head, kvh, m0, p0, n_pages, n_tiles, page_size, rows_per_page,
                      rows_per_head, cols_per_head, TILE_LIST, tile_beg, HEAD_DIM: gl.constexpr,
                      BLOCK_N: gl.constexpr, BOX: gl.constexpr, STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                      CUSTOM_MASK: gl.constexpr):
        """Q, then key tiles 0 .. n_tiles - 1 (CUSTOM_MASK: the tiles listed at ``TILE_LIST[tile_beg:]``)."""
        WG_M: gl.constexpr = q_desc.block_type.shape[0]
        for w in gl.static_range(NUM_CONSUMERS):
            mbarrier.expect(q_bars.index(w), q_desc.block_type.nbytes)
            tma.async_load(q_desc, [q_start + m0 + w * WG_M, head * HEAD_DIM], q_bars.index(w), q_smem.index(w))
        row_h = kvh * rows_per_head
        col = kvh * cols_per_head
        tile = n_tiles * 0
        if CUSTOM_MASK:
            tile = gl.load(TILE_LIST + tile_beg)
        rows = _tile_rows(KV_INDICES, p0, n_pages, tile, row_h, page_size, rows_per_page, BLOCK_N, BOX)
        for i in range(n_tiles):
            # The next tile's page ids are in flight while this tile waits for its slots.
            if CUSTOM_MASK:
                tile = gl.load(TILE_LIST + tile_beg + i + 1, mask=i + 1 < n_tiles, other=0)
            else:
                tile = i + 1
            nxt = _tile_rows(KV_INDICES, p0, n_pages, tile, row_h, page_size, rows_per_page, BLOCK_N, BOX)
            slot = i % STAGES
            phase = (i // STAGES) & 1
            mbarrier.wait(k_empty.index(slot), phase ^ 1)  # a fresh mbarrier passes phase 1 at once
            _issue_boxes(k_desc, k_bufs, k_ready.index(slot), slot, rows, col, BLOCK_N, BOX)
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            _issue_boxes(v_desc, v_bufs, v_ready.index(slot), slot, rows, col, BLOCK_N, BOX)
            rows = nxt

    @gluon.jit
    def _paged_consumer(q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready, v_empty, turns, o_desc, O, LSE,
                        q_start, head, m0, n_tiles, mask_from, stride_ot, stride_oh, stride_lt, stride_lh, qo_len,
                        kv_len, qk_scale, MASK_WORDS, word_off, row_words, TILE_LIST, tile_beg,
                        HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                        CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, O_TMA: gl.constexpr, WRITE_LSE: gl.constexpr,
                        NUM_CONSUMERS: gl.constexpr, WG: gl.constexpr, CUSTOM_MASK: gl.constexpr):
        """Consumer warpgroup WG: rows m0 + 64 WG .. + 63 of the request, then O (one TMA box when O_TMA and
        all 64 rows are the request's, else masked stores) and, with WRITE_LSE, the LSE. CUSTOM_MASK: query
        row r's mask words start at ``MASK_WORDS + word_off + r * row_words``."""
        WG_M: gl.constexpr = q_smem.shape[1]
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        m_w = m0 + WG * WG_M
        q_rows = m_w + gl.arange(0, WG_M, layout=gl.SliceLayout(1, s_layout))
        mask_rows = gl.where(q_rows < qo_len, word_off + q_rows * row_words, -1)
        acc, m_i, l_i = _ws_mainloop(q_smem.index(WG), k_bufs, v_bufs, q_bars.index(WG), q_bars.index(WG), k_ready,
                                     k_empty, v_ready, v_empty, turns.index(WG), turns.index((WG + 1) % NUM_CONSUMERS),
                                     m_w, n_tiles, 0, 0, mask_from, qo_len, kv_len, qk_scale, MASK_WORDS, mask_rows,
                                     TILE_LIST, tile_beg, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, PINGPONG, False, True,
                                     CUSTOM_MASK)
        l_o = gl.convert_layout(l_i, row_o)
        empty = l_o == 0.0
        out = acc / gl.expand_dims(gl.where(empty, 1.0, l_o), 1)
        # O goes out through this warpgroup's Q box (every GEMM reading it has completed): as one TMA box
        # when its 64 rows are all this request's, else 16 rows at a time in 16-byte vectors (a masked
        # store straight from the wgmma layout would hold a 64-bit address per element: 128 registers).
        dtype: gl.constexpr = q_smem.dtype
        q_box = q_smem.index(WG)
        gl.thread_barrier()
        q_box.store(out.to(dtype))
        if O_TMA and m_w + WG_M <= qo_len:
            fence_async_shared()
            gl.thread_barrier()
            tma.async_store(o_desc, [q_start + m_w, head * HEAD_DIM], q_box)
        else:
            gl.thread_barrier()
            blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
            cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, blk))
            for c in gl.static_range(WG_M // 16):
                r = m_w + c * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, blk))
                x = q_box.slice(c * 16, 16, dim=0).load(blk)
                ptrs = O + gl.expand_dims((q_start + r).to(gl.int64) * stride_ot + head.to(gl.int64) * stride_oh, 1) + \
                    gl.expand_dims(cols, 0)
                gl.store(ptrs, x, mask=gl.expand_dims(r < qo_len, 1) & gl.expand_dims(cols < HEAD_DIM, 0))
        if WRITE_LSE:
            offs = m_w + gl.arange(0, WG_M, layout=row_o)
            live = offs < qo_len
            tok = (q_start + offs).to(gl.int64)
            m_o = gl.convert_layout(m_i, row_o)
            lse = gl.where(empty, float("-inf"), (m_o + gl.log2(gl.where(empty, 1.0, l_o))) * LN2_JIT)
            gl.store(LSE + tok * stride_lt + head * stride_lh, lse, mask=live)
        if O_TMA:
            tma.store_wait(pendings=0)

    @gluon.jit
    def _write_empty(O, LSE, q_start, head, m0, qo_len, stride_ot, stride_oh, stride_lt, stride_lh,
                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, WRITE_LSE: gl.constexpr):
        """Rows of a request with no keys: zeros and (WRITE_LSE) LSE -inf."""
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        offs = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, blk))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, blk))
        live = offs < qo_len
        tok = (q_start + offs).to(gl.int64)
        ptrs = O + gl.expand_dims(tok * stride_ot + head.to(gl.int64) * stride_oh, 1) + gl.expand_dims(cols, 0)
        zero = gl.zeros([BLOCK_M, HEAD_DIM], O.dtype.element_ty, layout=blk)
        gl.store(ptrs, zero, mask=gl.expand_dims(live, 1) & gl.expand_dims(cols < HEAD_DIM, 0))
        if WRITE_LSE:
            gl.store(LSE + tok * stride_lt + head * stride_lh,
                     gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, blk)), mask=live)

    @gluon.jit(do_not_specialize=["stride_ot", "stride_oh", "stride_lt", "stride_lh", "page_size", "rows_per_page",
                                  "rows_per_head", "cols_per_head", "group_size"])
    def _paged_prefill_ws_kernel(q_desc, k_desc, v_desc, o_desc, O, LSE, QO_INDPTR, KV_INDPTR, KV_INDICES, KV_LAST,
                                 MASK_WORDS, MASK_META, TILE_INDPTR, TILE_LIST,
                                 stride_ot, stride_oh, stride_lt, stride_lh, page_size, rows_per_page, rows_per_head,
                                 cols_per_head, group_size, qk_scale,
                                 HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                 BOX: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                                 CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr, O_TMA: gl.constexpr,
                                 WRITE_LSE: gl.constexpr, CUSTOM_MASK: gl.constexpr, num_warps: gl.constexpr):
        """Grid ``(cdiv(max_qo_len, BLOCK_M), hq, batch)``; q_desc (and o_desc when O_TMA) over ``[nnz, hq * d]``
        (box ``[64, d]``), k/v descriptors over the caches' token rows (box ``[BOX, d]``). LSE is written
        when WRITE_LSE. CUSTOM_MASK: a planned mask (`pagoda.ops._mask`, the 128 x 128 tiling of one query head):
        ``MASK_META [batch, 3]`` (word offset, words a row, first query tile), ``TILE_INDPTR`` / ``TILE_LIST``
        the key tiles each query tile walks; otherwise those four pointers are unused."""
        gl.static_assert(num_warps == 4, "the default partition is consumer 0 (one warpgroup)")
        gl.static_assert(BLOCK_M == 2 * q_desc.block_type.shape[0], "one q box per consumer warpgroup")
        gl.static_assert(BLOCK_N % BOX == 0, "whole boxes per key tile")
        dtype: gl.constexpr = q_desc.dtype
        m0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M
        head = gl.program_id(1)
        b = gl.program_id(2)
        # Every metadata load is issued before the first use (one round trip, not three in a row).
        q_start = gl.load(QO_INDPTR + b).to(gl.int32)
        q_end = gl.load(QO_INDPTR + b + 1).to(gl.int32)
        p0 = gl.load(KV_INDPTR + b).to(gl.int32)
        p1 = gl.load(KV_INDPTR + b + 1).to(gl.int32)
        last = gl.load(KV_LAST + b).to(gl.int32)
        qo_len = q_end - q_start
        if m0 >= qo_len:
            return
        n_pages = p1 - p0
        kv_len = gl.where(n_pages > 0, (n_pages - 1) * page_size + last, 0)
        if kv_len <= 0:
            _write_empty(O, LSE, q_start, head, m0, qo_len, stride_ot, stride_oh, stride_lt, stride_lh,
                         HEAD_DIM, BLOCK_M, WRITE_LSE)
            return
        word_off = 0
        row_words = 0
        tile_beg = 0
        if CUSTOM_MASK:
            # The listed key tiles only; the bits hold the key bounds, so no positional mask.
            word_off = gl.load(MASK_META + b * 3)
            row_words = gl.load(MASK_META + b * 3 + 1)
            q_tile = gl.load(MASK_META + b * 3 + 2) + m0 // BLOCK_M
            tile_beg = gl.load(TILE_INDPTR + q_tile)
            n_tiles = gl.load(TILE_INDPTR + q_tile + 1) - tile_beg
            mask_from = kv_len + BLOCK_N
            if n_tiles == 0:   # no row of the tile sees a key
                _write_empty(O, LSE, q_start, head, m0, qo_len, stride_ot, stride_oh, stride_lt, stride_lh,
                             HEAD_DIM, BLOCK_M, WRITE_LSE)
                return
        else:
            n_tiles, mask_from = key_tiles(m0, qo_len, kv_len, BLOCK_M, BLOCK_N, CAUSAL)
        kvh = head // group_size
        slot2d: gl.constexpr = nvmma_2d(BLOCK_N, HEAD_DIM, dtype)
        q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], slot2d)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], slot2d)
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(2):
            mbarrier.init(q_bars.index(w), count=1)
            mbarrier.init(turns.index(w), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release every slot
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()
        if PINGPONG:
            mbarrier.arrive(turns.index(0), count=1)
        gl.warp_specialize([
            (_paged_consumer, (q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready, v_empty, turns, o_desc,
                               O, LSE, q_start, head, m0, n_tiles, mask_from, stride_ot, stride_oh, stride_lt,
                               stride_lh, qo_len, kv_len, qk_scale, MASK_WORDS, word_off, row_words, TILE_LIST,
                               tile_beg, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, PINGPONG, O_TMA, WRITE_LSE, 2, 0,
                               CUSTOM_MASK)),
            (_paged_consumer, (q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready, v_empty, turns, o_desc,
                               O, LSE, q_start, head, m0, n_tiles, mask_from, stride_ot, stride_oh, stride_lt,
                               stride_lh, qo_len, kv_len, qk_scale, MASK_WORDS, word_off, row_words, TILE_LIST,
                               tile_beg, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, PINGPONG, O_TMA, WRITE_LSE, 2, 1,
                               CUSTOM_MASK)),
            (_paged_loader, (q_desc, k_desc, v_desc, KV_INDICES, q_smem, k_bufs, v_bufs, q_bars, k_ready,
                             k_empty, v_ready, v_empty, q_start, head, kvh, m0, p0, n_pages, n_tiles,
                             page_size, rows_per_page, rows_per_head, cols_per_head, TILE_LIST, tile_beg, HEAD_DIM,
                             BLOCK_N, BOX, STAGES, 2, CUSTOM_MASK)),
        ], [4, 1], [CONSUMER_REGS, _LOADER_REGS])


def cache_rows(cache: torch.Tensor, k_strides, page_size: int, num_kv_heads: int, head_dim: int):
    """``(rows, cols, rows_per_page, rows_per_head, cols_per_head)`` of the 2-D token-row view of a 4-D
    paged cache with ``(page, token, head)`` strides ``k_strides`` (last dim contiguous), or None when the
    layout has no such view (token stride not 16-byte aligned, heads neither inside a row nor whole rows)."""
    sp, st, sh = k_strides
    es = cache.element_size()
    if cache.stride(-1) != 1 or st <= 0 or (st * es) % 16 or cache.data_ptr() % 16 or sp % st:
        return None
    pages = cache.shape[0]
    if sh == head_dim and num_kv_heads * head_dim <= st:  # NHD: a token row holds every head
        rows_per_head, cols_per_head, cols = 0, head_dim, num_kv_heads * head_dim
    elif sh % st == 0 and head_dim <= st:  # HND: a head's tokens are consecutive rows
        rows_per_head, cols_per_head, cols = sh // st, 0, head_dim
    else:
        return None
    rows = (pages - 1) * (sp // st) + (num_kv_heads - 1) * rows_per_head + page_size
    if rows >= 2 ** 31:
        return None
    return rows, cols, sp // st, rows_per_head, cols_per_head


def box_rows(page_size: int) -> int | None:
    """TMA box rows per page (None: this page size keeps the Triton kernel)."""
    if page_size in (16, 32, 64):
        return page_size
    return BLOCK_N if page_size % BLOCK_N == 0 else None


def options_unsupported(dtype: torch.dtype, head_dim: int, page_size: int, *, logits_soft_cap: float,
                        alibi: bool, rope: bool) -> str | None:
    """Why the Gluon paged kernel cannot run calls of these options, before any tensor exists (None: they are in
    scope; a plan asks this, `paged_unsupported` asks it again with the tensors)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (fp16/bf16 only)"
    if logits_soft_cap or alibi or rope:
        return "soft-cap, ALiBi or RoPE"
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} (64/128 only)"
    if box_rows(page_size) is None:
        return f"page_size {page_size} (16, 32, 64 or a multiple of {BLOCK_N})"
    return None


def paged_unsupported(q, k_cache, v_cache, k_strides, v_strides, page_size: int, num_kv_heads: int, *,
                      window_left: int, window_right: int, logits_soft_cap: float, alibi_slopes, rope,
                      num_splits: int) -> str | None:
    """Why the Gluon paged kernel cannot run this call, from its arguments alone (None: in scope). The
    device checks (CUDA, sm_90, Gluon importable) are `paged_supported`'s."""
    d = q.shape[-1]
    reason = options_unsupported(q.dtype, d, page_size, logits_soft_cap=logits_soft_cap,
                                 alibi=alibi_slopes is not None, rope=rope is not None)
    if reason is not None:
        return reason
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return "the KV cache dtype differs from q's"
    if num_splits > 0:
        return "split-KV planned"
    if window_left >= 0 or window_right > 0:
        return "sliding window"
    if not _rows_aligned(q, d):
        return "q rows not 16-byte aligned or heads not packed"
    for name, cache, strides in (("k_cache", k_cache, k_strides), ("v_cache", v_cache, v_strides)):
        if cache_rows(cache, strides, page_size, num_kv_heads, d) is None:
            return f"{name} has no 2-D token-row view (16-byte aligned rows, NHD or HND)"
    return None


def paged_supported(q, k_cache, v_cache, k_strides, v_strides, page_size: int, num_kv_heads: int, **options) -> bool:
    """Whether `prefill_paged_hopper` can run this call: sm_90, Gluon, and `paged_unsupported` finds nothing
    (keyword options as there)."""
    if not GLUON_OK or not q.is_cuda:
        return False
    if paged_unsupported(q, k_cache, v_cache, k_strides, v_strides, page_size, num_kv_heads, **options) is not None:
        return False
    return is_sm90(q.device.index if q.device.index is not None else torch.cuda.current_device())


def _cache_spec(cache, strides, page_size, num_kv_heads, d, box):
    """The TMA descriptor over the cache's 2-D token-row view, as `tma_launch` takes it (tensor, global shape,
    global strides, box, layout), and the view's rows_per_page, rows_per_head, cols_per_head."""
    rows, cols, rpp, rph, cph = cache_rows(cache, strides, page_size, num_kv_heads, d)
    block = (box, d)
    return (cache, [rows, cols], [strides[1], 1], block, smem_layout(block, cache.dtype)), rpp, rph, cph


@functools.cache   # one entry per (box, head_dim, dtype) checked, kept for the process
def _check_slot_layout(box: int, d: int, dtype: torch.dtype) -> None:
    """The box layout must be the ring slot's layout (row slices of one swizzled tile)."""
    slot, b = smem_layout((BLOCK_N, d), dtype), smem_layout((box, d), dtype)
    if slot != b:
        raise RuntimeError(f"paged Gluon prefill: box layout {b!r} differs from the slot layout {slot!r}")


def prefill_paged_hopper(q, k_cache, v_cache, k_strides, v_strides, qo_indptr, kv_indptr, kv_indices,
                         kv_last_page_len, page_size: int, num_kv_heads: int, max_qo_len: int, out, lse, *,
                         sm_scale: float, causal: bool, pingpong: bool = False, o_tma: bool = True,
                         custom_mask=None):
    """Launch the Gluon paged prefill (callers check `paged_supported`). Arguments as
    `pagoda.kernels.attention.prefill_paged.prefill_paged_fwd`: q/out ``[nnz, hq, d]``, lse float32 ``[nnz, hq]`` or
    None (not written). o_tma: whole 64-row boxes of O go out by TMA when out's rows allow it (else every
    row by masked stores). custom_mask: a `pagoda.ops._mask.MaskPlan` with its Gluon tiling (``gluon_tiles``);
    ``causal`` is then ignored."""
    batch = qo_indptr.shape[0] - 1
    hq, d = q.shape[1], q.shape[2]
    if batch == 0 or max_qo_len == 0 or q.shape[0] == 0:
        return
    box = box_rows(page_size)
    _check_slot_layout(box, d, q.dtype)
    with device_of((q,)):
        qb = (64, d)
        q_spec = (q, [q.shape[0], hq * d], [q.stride(0), 1], qb, smem_layout(qb, q.dtype))
        k_spec, rpp, rph, cph = _cache_spec(k_cache, k_strides, page_size, num_kv_heads, d, box)
        v_spec, v_rpp, v_rph, v_cph = _cache_spec(v_cache, v_strides, page_size, num_kv_heads, d, box)
        if (v_rpp, v_rph, v_cph) != (rpp, rph, cph):
            raise ValueError("paged Gluon prefill needs K and V caches of one layout")
        o_tma = o_tma and _rows_aligned(out, d)
        o_spec = (out, [out.shape[0], hq * d], [out.stride(0), 1], qb, smem_layout(qb, out.dtype)) if o_tma else q_spec
        lse_t, lse_strides = (lse, lse.stride()) if lse is not None else (out, (0, 0))
        grid = ((max_qo_len + BLOCK_M - 1) // BLOCK_M, hq, batch)
        masked = custom_mask is not None
        if masked:
            meta_g, indptr_g, list_g = custom_mask.gluon_tiles
            mask_ptrs = (custom_mask.words, meta_g, indptr_g, list_g)
        else:
            mask_ptrs = (qo_indptr,) * 4
        pointers = (out, lse_t, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, *mask_ptrs)
        args = (*pointers, out.stride(0), out.stride(1), lse_strides[0], lse_strides[1], page_size, rpp, rph, cph,
                hq // num_kv_heads, sm_scale * LOG2E)
        constexprs = dict(HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BOX=box, STAGES=STAGES,
                          CAUSAL=bool(causal) and not masked, CONSUMER_REGS=CONSUMER_REGS, PINGPONG=bool(pingpong),
                          O_TMA=o_tma, WRITE_LSE=lse is not None, CUSTOM_MASK=masked)
        # Repeat launches (`launch.tma`) are keyed by all the compiled kernel depends on: the dtype and boxes,
        # the constexprs, each pointer's element type and 16-byte alignment (every int argument is
        # do_not_specialize), the device.
        key = (_paged_prefill_ws_kernel, q.dtype, box, *constexprs.values(), *(t.dtype for t in pointers),
               *(t.data_ptr() % 16 == 0 for t in pointers), q.get_device()) if fast_launch_enabled() else None
        return tma_launch(key, _paged_prefill_ws_kernel, grid, (q_spec, k_spec, v_spec, o_spec), args, constexprs, 4,
                          MAXNREG)


def fast_launch_enabled() -> bool:
    """Repeat launches of the paged kernel through `launch.tma`: opt-in (PAGODA_PAGED_FAST_LAUNCH=1). Its GPU test
    (`test_paged_fast_launch_matches_normal_launch`) passes, but the engine's prefill step, the launch-heavy
    place it was meant for, measured no faster with it (docs/engine.md), so the default stays the normal launch;
    PAGODA_GLUON_FAST_LAUNCH=0 turns it off too."""
    return _switches.paged_fast_launch()


def _rows_aligned(t: torch.Tensor, d: int) -> bool:
    """``[nnz, h, d]`` with packed heads and 16-byte aligned token rows: a 2-D ``[nnz, h * d]`` TMA view."""
    return (t.stride(-1) == 1 and t.stride(1) == d and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)

"""Warp-specialised Gluon sm_90 attention forward (FA3-style): TMA + mbarrier ring + async wgmma.

The maths of one consumer warpgroup (64 query rows), per key tile j (scores in base 2, `gluon.softmax_tile`):

    S_j = Q K_j^T (async wgmma, smem x smem);  O += P_{j-1} V_{j-1} (async wgmma, P from registers)
    wait until S_j is done (P_{j-1} V_{j-1} still running), softmax(S_j) on the CUDA cores:
        m_new = max(m, rowmax(S_j) * scale);  P_j = 2^(S_j * scale - m_new) (one FMA + ex2 per score)
        l = l * alpha + rowsum(P_j), alpha = 2^(m - m_new)
    wait for P_{j-1} V_{j-1}; O *= alpha
    epilogue: O += P_{n-1} V_{n-1}; O / l -> shared memory -> TMA store (clipped at sq);
              LSE = (m + log2 l) ln 2 -> masked store into lse ``[b, hq, sq]``.

So the exponentials of tile j overlap the P.V GEMM of tile j-1. Work items are numbered query-tile major,
heaviest (most keys under a causal mask) first.

One CTA = one BLOCK_M = 64 * NUM_CONSUMERS tile of queries of one (batch, head) (NUM_CONSUMERS = 2:
128 rows, the ``wspp-*`` config; 3: 192 rows, ``ws3-*``, head_dim 64 only; 1: 64 rows, ``ws1x3-*``, three CTAs
per SM for short sequences), split over 1 + NUM_CONSUMERS partitions:

    loader       (1 warp)   TMA: Q (NUM_CONSUMERS boxes ``[1, 64, d]``), then K_i, V_i ``[1, BLOCK_N, d]``
                            into a ring of STAGES slots; waits on the slot's "empty" mbarrier (released by
                            every consumer: count NUM_CONSUMERS), arms its "ready" mbarrier (expect-tx)
    consumer w   (4 warps)  rows 64w .. 64w+63 of the tile: S_j = Q_w K_j^T, O_w += P_{j-1} V_{j-1}
                            (async wgmma), softmax(S_j) while P_{j-1} V_{j-1} runs; releases K_j / V_{j-1}
                            to the loader; O_w -> Q_w's smem box -> TMA store, LSE -> plain store

Consumer 0 is the default partition (the kernel's 4 warps); the others are worker partitions. The
consumer warpgroups are independent (no CTA-wide barrier in the loop), so the warp scheduler can run
one warpgroup's GEMMs while another does its softmax. With PINGPONG (``*pp-*`` configs) that order is
enforced, as FA3 does with named barriers: the warpgroups take turns to issue their GEMMs through a
ring of NUM_CONSUMERS "turn" mbarriers (warpgroup w waits on turn w, issues, arrives on turn
(w + 1) % NUM_CONSUMERS).

Registers (setmaxnreg): the launch caps every thread at ``maxnreg`` (all 4 * (NUM_CONSUMERS + 1) warps
must fit the SM's 64K registers: 168 for 12 warps, 128 for 16), then the partitions' budgets move the
loader's share to the consumers: worker consumers CONSUMER_REGS, loader 24, and Triton gives consumer 0
what is left (2 consumers: 240 / 240 / 24; 3 consumers: 168 / 160 / 160 / 24 = 64K exactly).

The persistent ``pws*`` configs (`pws`) run the same per-item bodies, `_ws_load_item` and
`_ws_consume`, with PERSISTENT=True (ring / phase counters carried across items, O staged in its own box).
"""
from __future__ import annotations

from pagoda.kernels._common import LN2_JIT
from pagoda.kernels.hopper.gluon import GLUON_OK

if GLUON_OK:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from pagoda.kernels.hopper.gluon import key_tiles, nvmma_2d, softmax_tile

    @gluon.jit
    def _ws_load_item(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bars, q_empty, k_ready, k_empty, v_ready,
                      v_empty, batch, head, m0, kv_col, n_tiles, it, item, HEAD_DIM: gl.constexpr,
                      BLOCK_N: gl.constexpr, STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                      PERSISTENT: gl.constexpr):
        """Loader of one work item: the Q boxes, then K_i / V_i (i < n_tiles) into ring slot
        ``(it + i) % STAGES``; ``it`` key tiles and ``item`` work items were loaded before by this program
        (0 unless PERSISTENT). PERSISTENT: Q box w is refilled only after consumer w has released it
        (``q_empty``, completion ``item - 1``)."""
        WG_M: gl.constexpr = q_desc.block_type.shape[1]
        for w in gl.static_range(NUM_CONSUMERS):
            if PERSISTENT:
                mbarrier.wait(q_empty.index(w), (item & 1) ^ 1)  # item 0: a fresh mbarrier passes at once
            mbarrier.expect(q_bars.index(w), q_desc.block_type.nbytes)
            tma.async_load(q_desc, [batch, m0 + w * WG_M, head * HEAD_DIM], q_bars.index(w),
                                            q_smem.index(w))
        for i in range(n_tiles):
            g = it + i
            slot = g % STAGES
            phase = (g // STAGES) & 1
            # A fresh mbarrier counts as having completed phase 1: the first STAGES waits pass at once.
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_load(k_desc, [batch, i * BLOCK_N, kv_col], k_ready.index(slot),
                                            k_bufs.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_load(v_desc, [batch, i * BLOCK_N, kv_col], v_ready.index(slot),
                                            v_bufs.index(slot))

    @gluon.jit
    def _ws_loader(q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty,
                   v_ready, v_empty, turns, batch, head, m0, kv_col, n_tiles, mask_from, stride_lb, stride_lh,
                   stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr,
                   PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr):
        _ws_load_item(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bars, q_bars, k_ready, k_empty, v_ready,
                      v_empty, batch, head, m0, kv_col, n_tiles, 0, 0, HEAD_DIM, BLOCK_N, STAGES, NUM_CONSUMERS,
                      False)

    @gluon.jit
    def _ws_mainloop(q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, my_turn, next_turn,
                     m0, n_tiles, it, item, mask_from, seqlen_q, seqlen_k, qk_scale, MASK_WORDS, mask_rows,
                     TILE_LIST, tile_beg, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, PERSISTENT: gl.constexpr, TAIL_V: gl.constexpr,
                     CUSTOM_MASK: gl.constexpr):
        """One consumer warpgroup's pipeline (the module's maths) on the 64 query rows from m0:
        returns the unnormalised O ``[64, HEAD_DIM]`` (fp32, wgmma layout), m_i and l_i (base 2).

        q_smem: this warpgroup's Q box (``[1, 64, d]`` or ``[64, d]``); k_bufs / v_bufs: the rings of
        STAGES ``BLOCK_N x HEAD_DIM`` slots (3-D dense boxes or 2-D paged slots). PINGPONG: the warpgroups
        take turns to issue their GEMMs (issue point t = 0..n_tiles: S_0, then S_j with P_{j-1} V_{j-1},
        then the last P V). A warpgroup waits for completion t of its own turn barrier, issues, and
        arrives on the next warpgroup's (``next_turn``), so one's GEMMs run while the others do their
        softmax.

        ``it`` key tiles and ``item`` work items were run before by this warpgroup (0 unless PERSISTENT):
        key tile j uses ring slot ``(it + j) % STAGES``, and as every item has n_tiles + 1 issue points the
        turn barriers are at completion ``it + item + t``. PERSISTENT also releases the Q box (``q_empty``,
        once S_{n-1} is done) and the last V slot.

        TAIL_V (paged KV, whose last tile holds the rest of a page: whatever the cache has there, NaN
        included): V rows at keys >= seqlen_k of the last tile are zeroed in shared memory before the last
        P V, so that their zero probabilities cannot meet a NaN or inf. Every consumer writes the same
        bytes (zeros, and the valid rows it read back unchanged) before its own GEMM reads them.

        CUSTOM_MASK (paged): the n_tiles key tiles are the ones listed at ``TILE_LIST[tile_beg:]`` (tile indices,
        in key order), and a score is visible iff its bit is set in the row's mask words: row r's words start at
        ``MASK_WORDS + mask_rows[r]`` (int32 ``[64]``, `mask_rows`; -1 for rows past the request, read as
        hidden). The callers pass ``mask_from`` past every key and CAUSAL False: the bits hold the bounds.
        Without it those four arguments are unused.
        """
        dtype: gl.constexpr = q_smem.dtype
        WG_M: gl.constexpr = q_smem.shape[q_smem.rank - 2]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        smem2d: gl.constexpr = nvmma_2d(BLOCK_N, HEAD_DIM, dtype)
        qsmem2d: gl.constexpr = nvmma_2d(WG_M, HEAD_DIM, dtype)
        shift = seqlen_k - seqlen_q

        rows = m0 + gl.arange(0, WG_M, layout=row_s)
        q_op = q_smem.reinterpret(dtype, [WG_M, HEAD_DIM], qsmem2d)
        s_zero = gl.zeros([WG_M, BLOCK_N], gl.float32, layout=s_layout)
        m_i = gl.full([WG_M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([WG_M], gl.float32, layout=row_s)
        acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, layout=o_layout)

        start = n_tiles * 0     # the current key tile's first key (a tensor: it is carried through the loop)
        nxt = n_tiles * 0
        if CUSTOM_MASK:
            start = gl.load(TILE_LIST + tile_beg) * BLOCK_N
            nxt = gl.load(TILE_LIST + tile_beg + 1, mask=n_tiles > 1, other=0) * BLOCK_N
            w0, w1, w2, w3 = _mask_words(MASK_WORDS, mask_rows, start, BLOCK_N)
        turn0 = it + item  # issue points of earlier items
        mbarrier.wait(q_bar, item & 1)
        mbarrier.wait(k_ready.index(it % STAGES), (it // STAGES) & 1)
        k_op = k_bufs.index(it % STAGES).reinterpret(dtype, [BLOCK_N, HEAD_DIM], smem2d).permute((1, 0))
        if PINGPONG:
            mbarrier.wait(my_turn, turn0 & 1)
        s_tok = warpgroup_mma(q_op, k_op, s_zero, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(next_turn, count=1)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        gl.thread_barrier()
        mbarrier.arrive(k_empty.index(it % STAGES), count=1)
        if CUSTOM_MASK:
            s = _hide_masked(s, w0, w1, w2, w3, BLOCK_N, s_layout)
        p, alpha, m_i, l_i = softmax_tile(s, m_i, l_i, qk_scale, start, mask_from, rows, seqlen_k, shift,
                                           CAUSAL, BLOCK_N, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        for j in range(1, n_tiles):
            if CUSTOM_MASK:
                # This tile's words are read while its S runs; the next tile's index is read a tile ahead.
                start = nxt
                nxt = gl.load(TILE_LIST + tile_beg + j + 1, mask=j + 1 < n_tiles, other=0) * BLOCK_N
                u0, u1, u2, u3 = _mask_words(MASK_WORDS, mask_rows, start, BLOCK_N)
            else:
                start = j * BLOCK_N
            g = it + j
            slot = g % STAGES
            prev = (g - 1) % STAGES
            mbarrier.wait(k_ready.index(slot), (g // STAGES) & 1)
            k_op = k_bufs.index(slot).reinterpret(dtype, [BLOCK_N, HEAD_DIM], smem2d).permute((1, 0))
            mbarrier.wait(v_ready.index(prev), ((g - 1) // STAGES) & 1)
            v_op = v_bufs.index(prev).reinterpret(dtype, [BLOCK_N, HEAD_DIM], smem2d)
            if PINGPONG:
                mbarrier.wait(my_turn, (turn0 + j) & 1)
            s_tok = warpgroup_mma(q_op, k_op, s_zero, use_acc=False, is_async=True)
            o_tok = warpgroup_mma(p_op, v_op, acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(next_turn, count=1)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            gl.thread_barrier()
            mbarrier.arrive(k_empty.index(slot), count=1)
            if CUSTOM_MASK:
                s = _hide_masked(s, u0, u1, u2, u3, BLOCK_N, s_layout)
            p, alpha, m_i, l_i = softmax_tile(s, m_i, l_i, qk_scale, start, mask_from, rows, seqlen_k,
                                               shift, CAUSAL, BLOCK_N, s_layout)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma_wait(0, deps=(o_tok,))
            gl.thread_barrier()
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)

        if PERSISTENT:
            # S_{n-1} is done in every warp of this warpgroup (the barrier after its wait): the loader may
            # bring the next item's Q into this box while the last P V and the epilogue run.
            mbarrier.arrive(q_empty, count=1)
        last = it + n_tiles - 1
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        v_op = v_bufs.index(last % STAGES).reinterpret(dtype, [BLOCK_N, HEAD_DIM], smem2d)
        if TAIL_V:
            n_valid = seqlen_k - start   # the last tile's first key (a listed tile's under CUSTOM_MASK)
            if n_valid < BLOCK_N:
                _zero_rows_from(v_op, n_valid, BLOCK_N, HEAD_DIM)
        if PINGPONG:
            mbarrier.wait(my_turn, (turn0 + n_tiles) & 1)
        o_tok = warpgroup_mma(p_op, v_op, acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(next_turn, count=1)
        acc = warpgroup_mma_wait(0, deps=(o_tok,))
        if PERSISTENT:
            gl.thread_barrier()
            mbarrier.arrive(v_empty.index(last % STAGES), count=1)
        return acc, m_i, l_i

    @gluon.jit
    def _mask_words(MASK_WORDS, mask_rows, start, BLOCK_N: gl.constexpr):
        """The 4 int32 mask words ``[64]`` each (row layout of the scores) of the key tile at ``start``
        (BLOCK_N = 128 keys, 32 a word; rows with ``mask_rows < 0`` read 0: hidden)."""
        gl.static_assert(BLOCK_N == 128, "custom masks take 128-key tiles: four words a row")
        live = mask_rows >= 0
        base = MASK_WORDS + mask_rows + (start >> 5)
        w0 = gl.load(base, mask=live, other=0)
        w1 = gl.load(base + 1, mask=live, other=0)
        w2 = gl.load(base + 2, mask=live, other=0)
        w3 = gl.load(base + 3, mask=live, other=0)
        return w0, w1, w2, w3

    @gluon.jit
    def _hide_masked(s, w0, w1, w2, w3, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """``s [64, BLOCK_N]`` with the scores whose mask bit (`_mask_words`) is clear set to -inf. A thread's
        columns are fixed by the wgmma layout, so the word a score reads and its bit position fold to constants
        per register: a bit test and a select a score."""
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        word = gl.expand_dims(cols >> 5, 0)
        sel = gl.where(word == 0, gl.expand_dims(w0, 1), gl.where(word == 1, gl.expand_dims(w1, 1), gl.where(
            word == 2, gl.expand_dims(w2, 1), gl.expand_dims(w3, 1))))
        bit = (sel >> gl.expand_dims(cols & 31, 0)) & 1
        return gl.where(bit != 0, s, float("-inf"))

    @gluon.jit
    def _zero_rows_from(tile, n_valid, ROWS: gl.constexpr, COLS: gl.constexpr):
        """Zero rows ``>= n_valid`` of a ``[ROWS, COLS]`` shared-memory tile (one warpgroup, 16 rows at a
        time); the async proxy (wgmma, TMA) sees the writes once this returns."""
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        for c in gl.static_range(ROWS // 16):
            if (c + 1) * 16 > n_valid:
                chunk = tile.slice(c * 16, 16, dim=0)
                x = chunk.load(blk)
                r = c * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, blk))
                chunk.store(gl.where(gl.expand_dims(r < n_valid, 1), x, gl.zeros_like(x)))
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def _ws_consume(q_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty,
                    v_ready, v_empty, my_turn, next_turn, batch, head, m0, n_tiles, it, item, mask_from,
                    stride_lb, stride_lh, stride_lt, seqlen_q, seqlen_k, qk_scale,
                    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                    WRITE_LSE: gl.constexpr, PINGPONG: gl.constexpr, PERSISTENT: gl.constexpr):
        """One consumer warpgroup of the dense kernels: `_ws_mainloop`, then O / l -> ``o_smem`` (the Q box
        itself unless PERSISTENT) -> TMA store, and the LSE. PERSISTENT leaves the O store in flight: it
        is drained before o_smem is written again (next item) and at the end of the program."""
        dtype: gl.constexpr = q_desc.dtype
        WG_M: gl.constexpr = q_desc.block_type.shape[1]
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        qsmem2d: gl.constexpr = nvmma_2d(WG_M, HEAD_DIM, dtype)
        acc, m_i, l_i = _ws_mainloop(q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty,
                                     my_turn, next_turn, m0, n_tiles, it, item, mask_from, seqlen_q, seqlen_k,
                                     qk_scale, LSE, 0, LSE, 0, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, PINGPONG,
                                     PERSISTENT, False, False)

        l_o = gl.convert_layout(l_i, row_o)
        empty = l_o == 0.0
        out = acc / gl.expand_dims(gl.where(empty, 1.0, l_o), 1)
        if PERSISTENT:
            tma.store_wait(pendings=0)  # the previous item's O store has read o_smem
        gl.thread_barrier()
        o_smem.reinterpret(dtype, [WG_M, HEAD_DIM], qsmem2d).store(out.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        tma.async_store(o_desc, [batch, m0, head * HEAD_DIM], o_smem)
        if WRITE_LSE:
            m_o = gl.convert_layout(m_i, row_o)
            lse = gl.where(empty, float("-inf"), (m_o + gl.log2(gl.where(empty, 1.0, l_o))) * LN2_JIT)
            offs = m0 + gl.arange(0, WG_M, layout=row_o)
            base = LSE + batch.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh
            gl.store(base + offs.to(gl.int64) * stride_lt, lse, mask=offs < seqlen_q)
        if not PERSISTENT:
            tma.store_wait(pendings=0)

    @gluon.jit
    def _ws_consumer_wg(q_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready, v_empty,
                        turns, batch, head, m0, n_tiles, mask_from, stride_lb, stride_lh, stride_lt, seqlen_q,
                        seqlen_k, qk_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                        CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr, PINGPONG: gl.constexpr,
                        NUM_CONSUMERS: gl.constexpr, WG: gl.constexpr):
        """Consumer warpgroup WG of NUM_CONSUMERS: rows m0 + 64 WG .. +63, Q box WG, turn WG -> WG + 1."""
        WG_M: gl.constexpr = q_desc.block_type.shape[1]
        # The tile's mask_from is its first row's: this warpgroup's rows start WG_M * WG later, so causal
        # tiles below its own first row need no mask (at most seqlen_k: the zero-filled tail still does).
        wg_mask_from = gl.minimum(mask_from + WG * WG_M, seqlen_k)
        _ws_consume(q_desc, o_desc, LSE, q_smem.index(WG), q_smem.index(WG), k_bufs, v_bufs, q_bars.index(WG),
                    q_bars.index(WG), k_ready, k_empty, v_ready, v_empty, turns.index(WG),
                    turns.index((WG + 1) % NUM_CONSUMERS), batch, head, m0 + WG * WG_M, n_tiles, 0, 0, wg_mask_from,
                    stride_lb, stride_lh, stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N, STAGES,
                    CAUSAL, WRITE_LSE, PINGPONG, False)

    @gluon.jit(do_not_specialize=["stride_lb", "stride_lh", "stride_lt", "seqlen_q", "seqlen_k", "group_size"])
    def _attn_fwd_hopper_ws_kernel(q_desc, k_desc, v_desc, o_desc, LSE,
                                   stride_lb, stride_lh, stride_lt,
                                   seqlen_q, seqlen_k, group_size, qk_scale,
                                   HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                   STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr,
                                   CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr,
                                   NUM_CONSUMERS: gl.constexpr, num_warps: gl.constexpr):
        """Grid ``(cdiv(sq, BLOCK_M), hq, b)``; descriptors over ``[b, s, h*d]`` with boxes q/o
        ``[1, 64, d]``, k/v ``[1, BLOCK_N, d]``; LSE ``[b, hq, sq]`` (strides given) when WRITE_LSE."""
        gl.static_assert(num_warps == 4, "the default partition is consumer 0 (one warpgroup)")
        gl.static_assert(NUM_CONSUMERS >= 1 and NUM_CONSUMERS <= 3, "1 to 3 consumer warpgroups")
        gl.static_assert(NUM_CONSUMERS > 1 or not PINGPONG, "ping-pong needs two consumer warpgroups")
        gl.static_assert(BLOCK_M == NUM_CONSUMERS * q_desc.block_type.shape[1], "one q/o box per consumer")
        dtype: gl.constexpr = q_desc.dtype
        head = gl.program_id(1)
        batch = gl.program_id(2)
        # Heaviest tiles first. Causal tiles are aligned to the last query row, so that when sq is not a
        # multiple of BLOCK_M the short tile is the top one, whose rows see the fewest keys, instead of the
        # bottom one, which would run every key tile for a third of its rows at BLOCK_M 192 (s = 4096: 5.5%
        # fewer key tiles in all). The top tile is clamped to row 0 (TMA boxes at negative rows fault on the
        # H200): it overlaps the next tile, and both write the same values to the shared rows (a row's
        # result depends only on its own keys; the extra, fully masked key tiles leave it unchanged).
        if CAUSAL:
            m0 = gl.maximum(seqlen_q - (gl.program_id(0) + 1) * BLOCK_M, 0)
        else:
            m0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M
        kv_col = (head // group_size) * HEAD_DIM
        # Key range of the whole tile (every consumer runs the same n_tiles; a warpgroup whose rows see
        # fewer keys gets fully masked rows in the last tiles, which leave its softmax state unchanged;
        # each warpgroup masks from its own first row, `_ws_consumer_wg`).
        n_tiles, mask_from = key_tiles(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)

        q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(NUM_CONSUMERS):
            mbarrier.init(q_bars.index(w), count=1)
            mbarrier.init(turns.index(w), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            # Every consumer warpgroup releases every slot.
            mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)
            mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)
        fence_async_shared()
        if PINGPONG:
            mbarrier.arrive(turns.index(0), count=1)  # consumer 0 issues first

        # Partitions: consumer 0 (default, 4 warps), consumers 1.. (4 warps, CONSUMER_REGS each), loader
        # (1 warp, 24 registers). (The argument tuples are written out: a tuple bound to a name turns its
        # constexprs into tensors; the literal warpgroup index
        # ending a consumer's tuple stays a constexpr.)
        if NUM_CONSUMERS == 1:
            gl.warp_specialize([
                (_ws_consumer_wg, (q_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready,
                                   v_empty, turns, batch, head, m0, n_tiles, mask_from, stride_lb, stride_lh,
                                   stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N, STAGES, CAUSAL,
                                   WRITE_LSE, PINGPONG, NUM_CONSUMERS, 0)),
                (_ws_loader, (q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty,
                              v_ready, v_empty, turns, batch, head, m0, kv_col, n_tiles, mask_from, stride_lb,
                              stride_lh, stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N, STAGES, CAUSAL,
                              WRITE_LSE, PINGPONG, NUM_CONSUMERS)),
            ], [1], [24])
        elif NUM_CONSUMERS == 2:
            gl.warp_specialize([
                (_ws_consumer_wg, (q_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready,
                                   v_empty, turns, batch, head, m0, n_tiles, mask_from, stride_lb, stride_lh,
                                   stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N, STAGES, CAUSAL,
                                   WRITE_LSE, PINGPONG, NUM_CONSUMERS, 0)),
                (_ws_consumer_wg, (q_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready,
                                   v_empty, turns, batch, head, m0, n_tiles, mask_from, stride_lb, stride_lh,
                                   stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N, STAGES, CAUSAL,
                                   WRITE_LSE, PINGPONG, NUM_CONSUMERS, 1)),
                (_ws_loader, (q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty,
                              v_ready, v_empty, turns, batch, head, m0, kv_col, n_tiles, mask_from, stride_lb,
                              stride_lh, stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N, STAGES, CAUSAL,
                              WRITE_LSE, PINGPONG, NUM_CONSUMERS)),
            ], [4, 1], [CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([
                (_ws_consumer_wg, (q_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready,
                                   v_empty, turns, batch, head, m0, n_tiles, mask_from, stride_lb, stride_lh,
                                   stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N, STAGES, CAUSAL,
                                   WRITE_LSE, PINGPONG, NUM_CONSUMERS, 0)),
                (_ws_consumer_wg, (q_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready,
                                   v_empty, turns, batch, head, m0, n_tiles, mask_from, stride_lb, stride_lh,
                                   stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N, STAGES, CAUSAL,
                                   WRITE_LSE, PINGPONG, NUM_CONSUMERS, 1)),
                (_ws_consumer_wg, (q_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready,
                                   v_empty, turns, batch, head, m0, n_tiles, mask_from, stride_lb, stride_lh,
                                   stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N, STAGES, CAUSAL,
                                   WRITE_LSE, PINGPONG, NUM_CONSUMERS, 2)),
                (_ws_loader, (q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bars, k_ready, k_empty,
                              v_ready, v_empty, turns, batch, head, m0, kv_col, n_tiles, mask_from, stride_lb,
                              stride_lh, stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N, STAGES, CAUSAL,
                              WRITE_LSE, PINGPONG, NUM_CONSUMERS)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])

"""Persistent variant of the warp-specialised Gluon sm_90 attention forward (``pws-*`` / ``pwspp-*`` configs).

Same partitions as `ws` (TMA loader warp + NUM_CONSUMERS = 2 consumer warpgroups of 64
query rows, ``pwspp``: ping-pong GEMM turns; three, ``pws3``, head_dim 64; or one consumer, ``pws1x2`` /
``pws1x3``, with 2-3 programs per SM), but the grid is ``min(#work items, #SMs x programs per SM)`` programs
and each program strides over the work items w = program_id, program_id + num_programs, ... A work item is (query tile
of BLOCK_M rows, head,
batch), numbered (batch, head) major and, within a head, last query tile first (under a causal mask the
most keys first). So the programs running at one time share a few heads' K/V in L2: numbered query-tile
major, every running item would read another head's K/V, and at b32 s512 d=64 each head's K/V (128 KB,
134 MB in all) would come from DRAM once per query tile, 8 times (H200: 233 against 346 TF/s for the same
kernel with one item per CTA). Under a causal mask the host makes the program count
coprime with the query tiles per head, so that every program's items cycle through all tile heights.

Why: at short sequences (b=32, s=512: 4 key tiles per item) a one-item CTA spends a large share of its
life on its launch, the Q load, the pipeline fill and the epilogue. Here the loader streams the next
item's Q and first K/V tiles while the consumers finish the current item, and the O store of an item
drains while the next one runs (O is staged in its own smem boxes, not in Q's).

Shared memory: Q ``[2, 1, 64, d]``, O ``[2, 1, 64, d]``, K and V ``[STAGES, 1, BLOCK_N, d]`` each; d=128,
STAGES=2, BLOCK_N=128: 32 + 32 + 128 KB = 192 KB (the non-persistent kernel: 160 KB), so STAGES=3 at d=128
(256 KB) does not fit.

Ring / mbarrier invariant (what makes the phases right across items). Every partition of a program
visits the same items in the same order, so it can count on its own:
    it    = key tiles of the program's earlier items; item = earlier items.
Key tile j of the current item is global tile g = it + j: ring slot g % STAGES, and it is the
(g // STAGES)-th use of that slot, so
    k_ready / v_ready[slot]  complete once per load: consumers wait parity (g // STAGES) & 1;
    k_empty / v_empty[slot]  (count NUM_CONSUMERS) complete once per use, when every consumer has released
                             the tile (K after S_j, V after P_j V_j, the last V of an item included): the
                             loader waits parity ((g // STAGES) & 1) ^ 1 before load g (use g - STAGES
                             released; a fresh mbarrier passes parity 1, so the first STAGES loads go at once);
    q_bars[w]                completes once per item (Q box w loaded): consumer w waits parity item & 1;
    q_empty[w]               (count 1) completes once per item, when consumer w's S_{n-1} is done (Q box w
                             no longer read): the loader waits parity (item & 1) ^ 1 before loading item's Q;
    turns[w] (PINGPONG)      every item has n_tiles + 1 GEMM issue points, the same in every warpgroup, so
                             issue point t of an item is global point it + item + t: consumer w waits
                             turns[w] parity (it + item + t) & 1 and arrives on turns[(w + 1) % 2].
No barrier can run two phases ahead of a waiter (which would alias the parity): each completion needs
an arrival that follows the waiter's previous wait (ready <- load <- empty <- consumer's wait on ready;
q_empty <- consumer's wait on q_bars <- load <- loader's wait on q_empty; the turns alternate).
O boxes: only their own consumer touches them; it waits for its previous TMA store to have read the box
(``tma.store_wait``) before writing the next O, and drains the last one before the program ends.
"""
from __future__ import annotations

from pagoda.kernels.hopper.gluon import GLUON_OK

if GLUON_OK:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    from pagoda.kernels.hopper.gluon import key_tiles
    from pagoda.kernels.hopper.ws import _ws_consume, _ws_load_item

    @gluon.jit
    def _pws_item(w, seqlen_q, seqlen_k, group_size, num_heads, HEAD_DIM: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """Work item w -> (batch, head, first query row m0, K/V column, key tiles n_tiles, mask_from): (batch,
        head) major, last query tile first; keys [0, n_tiles * BLOCK_N), those >= mask_from maybe masked."""
        num_m = gl.cdiv(seqlen_q, BLOCK_M)
        start_m = num_m - 1 - w % num_m
        head = (w // num_m) % num_heads
        batch = (w // num_m) // num_heads
        m0 = start_m * BLOCK_M
        kv_col = (head // group_size) * HEAD_DIM
        n_tiles, mask_from = key_tiles(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
        return batch, head, m0, kv_col, n_tiles, mask_from

    @gluon.jit
    def _pws_loader(q_desc, k_desc, v_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty, k_ready,
                    k_empty, v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q, seqlen_k,
                    group_size, num_heads, num_items, qk_scale, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr,
                    PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr):
        """Loader warp: Q then K/V tiles of every item of this program, through the same ring."""
        it = 0
        item = 0
        for w in range(gl.program_id(0), num_items, gl.num_programs(0)):
            batch, head, m0, kv_col, n_tiles, mask_from = _pws_item(w, seqlen_q, seqlen_k, group_size, num_heads,
                                                                    HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL)
            _ws_load_item(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bars, q_empty, k_ready, k_empty,
                          v_ready, v_empty, batch, head, m0, kv_col, n_tiles, it, item, HEAD_DIM, BLOCK_N, STAGES,
                          NUM_CONSUMERS, True)
            it += n_tiles
            item += 1

    @gluon.jit
    def _pws_consumer_wg(q_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty, k_ready, k_empty,
                         v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q, seqlen_k, group_size,
                         num_heads, num_items, qk_scale, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                         WRITE_LSE: gl.constexpr, PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                         WG: gl.constexpr):
        """Consumer warpgroup WG: rows m0 + 64 WG .. +63 of every item of this program (Q box / O box WG)."""
        WG_M: gl.constexpr = q_desc.block_type.shape[1]
        it = 0
        item = 0
        for w in range(gl.program_id(0), num_items, gl.num_programs(0)):
            batch, head, m0, kv_col, n_tiles, mask_from = _pws_item(w, seqlen_q, seqlen_k, group_size, num_heads,
                                                                    HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL)
            _ws_consume(q_desc, o_desc, LSE, q_smem.index(WG), o_smem.index(WG), k_bufs, v_bufs, q_bars.index(WG),
                        q_empty.index(WG), k_ready, k_empty, v_ready, v_empty, turns.index(WG),
                        turns.index((WG + 1) % NUM_CONSUMERS), batch, head, m0 + WG * WG_M, n_tiles, it, item,
                        mask_from, stride_lb, stride_lh, stride_lt, seqlen_q, seqlen_k, qk_scale, HEAD_DIM, BLOCK_N,
                        STAGES, CAUSAL, WRITE_LSE, PINGPONG, True)
            it += n_tiles
            item += 1
        tma.store_wait(pendings=0)  # the last item's O store has left o_smem

    @gluon.jit(do_not_specialize=["stride_lb", "stride_lh", "stride_lt", "seqlen_q", "seqlen_k", "group_size",
                                  "num_heads", "num_items"])
    def _attn_fwd_hopper_pws_kernel(q_desc, k_desc, v_desc, o_desc, LSE,
                                    stride_lb, stride_lh, stride_lt,
                                    seqlen_q, seqlen_k, group_size, num_heads, num_items, qk_scale,
                                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                    STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr,
                                    CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr,
                                    NUM_CONSUMERS: gl.constexpr, num_warps: gl.constexpr):
        """Grid ``(min(num_items, #SMs x programs per SM),)``, num_items = cdiv(sq, BLOCK_M) * hq * b;
        descriptors over ``[b, s, h*d]`` with boxes q/o ``[1, 64, d]``, k/v ``[1, BLOCK_N, d]``; LSE ``[b, hq, sq]``
        (strides given) when WRITE_LSE."""
        gl.static_assert(num_warps == 4, "the default partition is consumer 0 (one warpgroup)")
        gl.static_assert(NUM_CONSUMERS >= 1 and NUM_CONSUMERS <= 3, "1 to 3 consumer warpgroups")
        gl.static_assert(NUM_CONSUMERS > 1 or not PINGPONG, "ping-pong needs two consumer warpgroups")
        gl.static_assert(BLOCK_M == NUM_CONSUMERS * q_desc.block_type.shape[1], "one q/o box per consumer")
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
        o_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + o_desc.block_type.shape, o_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(NUM_CONSUMERS):
            mbarrier.init(q_bars.index(w), count=1)
            mbarrier.init(q_empty.index(w), count=1)
            mbarrier.init(turns.index(w), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)
            mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)
        fence_async_shared()
        if PINGPONG:
            mbarrier.arrive(turns.index(0), count=1)  # consumer 0 issues first

        # Partitions: consumer 0 (default, 4 warps), consumer 1 (4 warps, CONSUMER_REGS), loader (1 warp,
        # 24 registers). (The argument tuples are written out: a tuple bound to a name turns its constexprs
        # into tensors; the literal warpgroup index
        # ending a consumer's tuple stays a constexpr.)
        if NUM_CONSUMERS == 1:
            gl.warp_specialize([
                (_pws_consumer_wg, (q_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty, k_ready,
                                    k_empty, v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q,
                                    seqlen_k, group_size, num_heads, num_items, qk_scale, HEAD_DIM, BLOCK_M,
                                    BLOCK_N, STAGES, CAUSAL, WRITE_LSE, PINGPONG, NUM_CONSUMERS, 0)),
                (_pws_loader, (q_desc, k_desc, v_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty,
                               k_ready, k_empty, v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q,
                               seqlen_k, group_size, num_heads, num_items, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
                               STAGES, CAUSAL, WRITE_LSE, PINGPONG, NUM_CONSUMERS)),
            ], [1], [24])
        elif NUM_CONSUMERS == 2:
            gl.warp_specialize([
                (_pws_consumer_wg, (q_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty, k_ready,
                                    k_empty, v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q,
                                    seqlen_k, group_size, num_heads, num_items, qk_scale, HEAD_DIM, BLOCK_M,
                                    BLOCK_N, STAGES, CAUSAL, WRITE_LSE, PINGPONG, NUM_CONSUMERS, 0)),
                (_pws_consumer_wg, (q_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty, k_ready,
                                    k_empty, v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q,
                                    seqlen_k, group_size, num_heads, num_items, qk_scale, HEAD_DIM, BLOCK_M,
                                    BLOCK_N, STAGES, CAUSAL, WRITE_LSE, PINGPONG, NUM_CONSUMERS, 1)),
                (_pws_loader, (q_desc, k_desc, v_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty,
                               k_ready, k_empty, v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q,
                               seqlen_k, group_size, num_heads, num_items, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                               CAUSAL, WRITE_LSE, PINGPONG, NUM_CONSUMERS)),
            ], [4, 1], [CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([
                (_pws_consumer_wg, (q_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty, k_ready,
                                    k_empty, v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q,
                                    seqlen_k, group_size, num_heads, num_items, qk_scale, HEAD_DIM, BLOCK_M,
                                    BLOCK_N, STAGES, CAUSAL, WRITE_LSE, PINGPONG, NUM_CONSUMERS, 0)),
                (_pws_consumer_wg, (q_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty, k_ready,
                                    k_empty, v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q,
                                    seqlen_k, group_size, num_heads, num_items, qk_scale, HEAD_DIM, BLOCK_M,
                                    BLOCK_N, STAGES, CAUSAL, WRITE_LSE, PINGPONG, NUM_CONSUMERS, 1)),
                (_pws_consumer_wg, (q_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty, k_ready,
                                    k_empty, v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q,
                                    seqlen_k, group_size, num_heads, num_items, qk_scale, HEAD_DIM, BLOCK_M,
                                    BLOCK_N, STAGES, CAUSAL, WRITE_LSE, PINGPONG, NUM_CONSUMERS, 2)),
                (_pws_loader, (q_desc, k_desc, v_desc, o_desc, LSE, q_smem, o_smem, k_bufs, v_bufs, q_bars, q_empty,
                               k_ready, k_empty, v_ready, v_empty, turns, stride_lb, stride_lh, stride_lt, seqlen_q,
                               seqlen_k, group_size, num_heads, num_items, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                               CAUSAL, WRITE_LSE, PINGPONG, NUM_CONSUMERS)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])

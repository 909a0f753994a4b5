"""Hopper (sm_90) prefill attention forward in Gluon: TMA + mbarrier pipeline + async wgmma (FA3-style).

Scope: dense batches q ``[b, sq, hq, d]``, k/v ``[b, sk, hk, d]`` (hq a multiple of hk), fp16/bf16,
head_dim 64 or 128, causal (bottom-right aligned, as flash-attn 2) or not. Everything else (windows,
ALiBi, softcap, varlen, other head dims) keeps using `pagoda.kernels.attention.fwd`.

Pipeline of one work item (one BLOCK_M tile of queries of one (batch, head); 4 or 8 warps = 1 or 2
warpgroups, each warpgroup owning 64 query rows of the wgmma):

    prologue   TMA: Q, then K/V tiles 0..STAGES-1 into a ring of STAGES smem slots (one mbarrier per
               slot and operand, armed with expect-tx bytes)
               S_0 = Q K_0^T (wgmma) ; softmax(S_0) -> P_0 ; barrier ; TMA K_STAGES into K_0's slot
    tile j>=1  issue S_j = Q K_j^T        (async wgmma, smem x smem)
               issue O  += P_{j-1} V_{j-1} (async wgmma, P from registers)
               wait until <= 1 wgmma group is outstanding  -> S_j is ready, PV_{j-1} still running
               softmax(S_j) on the CUDA cores (max, one FMA + ex2 per score, row sums)  || PV_{j-1}
               wait for PV_{j-1}; O *= alpha_j ; barrier ; TMA K_{j+STAGES}, V_{j-1+STAGES} into the
               slots just released
    epilogue   O += P_{n-1} V_{n-1}; O / l -> smem (Q's buffer) -> TMA store (clipped at sq);
               LSE = (m + log2 l) ln 2 -> plain masked store into lse ``[b, hq, sq]``.

Work items are numbered query-tile major, heaviest (most keys under a causal mask) first. The default
grid runs one item per program; the ``p-*`` configs launch one program per SM that strides over the
items (persistent), carrying the ring's slot / mbarrier-phase counters from item to item. The ``ws-*``
configs use the warp-specialised kernel of `attention_hopper_ws` (TMA producer warp + 1-3 consumer
warpgroups); the ``pws*`` configs run it persistently (`attention_hopper_pws`). The
configs and the default-dispatch policy are in `attention_hopper_configs`.

So the exponentials of tile j overlap the P.V GEMM of tile j-1 (FA3's intra-warpgroup overlap), and
the loads run STAGES-1 tiles ahead. Scores stay in base 2: max over raw products, then
``p = 2^(qk * scale*log2e - m)`` (one FMA before ex2).

Descriptors: host-side TMA descriptors over the 3-D views ``[b, s, h*d]`` with ``[1, BLOCK, d]`` boxes.
The sequence axis is its own descriptor dimension, so reads past a sequence's end are zero-filled
(never the next batch's rows) and the output store is clipped at ``sq``. This needs ``stride(2) == d``,
a contiguous last dim and 16-byte aligned strides and bases (checked by `hopper_supported`).
"""
from __future__ import annotations

import functools
import math

import torch

from pagoda.kernels.launch.fast import device_of
from pagoda.kernels.launch.tma import tma_launch
# The launch configurations and the dispatch policy (re-exported: the launch code, probes and tests use them
# from here).
from pagoda.kernels.hopper.configs import (CONFIGS, DEFAULT_CONFIG, HEAD_DIMS, MIN_SEQLEN_K,  # noqa: F401
                                                     CONFIG_BY_LENGTH, WS3_HEAD_DIMS, WS_CONFIGS, WS_CTAS_PER_SM,
                                                     _WS_MAXNREG, _ws_params, _ws_persistent, config_head_dims,
                                                     default_config, prefer_hopper)

try:  # Gluon is experimental: any import problem just disables this path.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                    warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401 - what _tma_launch builds
    # Triton 3.6 names the shared-memory view `_reinterpret`; later releases `reinterpret` (3.9 has only
    # that). The kernels call `reinterpret`, so give 3.6 the public name.
    _smem_desc = gl.shared_memory_descriptor
    if not hasattr(_smem_desc, "reinterpret"):
        _smem_desc.reinterpret = _smem_desc._reinterpret
    if not hasattr(gl, "thread_barrier"):  # 3.9 folded it into `barrier`
        gl.thread_barrier = gl.barrier
    if not hasattr(tma, "async_load"):  # 3.6 names of the TMA copies (same arguments)
        tma.async_load = tma.async_copy_global_to_shared
        tma.async_store = tma.async_copy_shared_to_global
    _GLUON_OK = True
except Exception:  # pragma: no cover - depends on the installed triton
    _GLUON_OK = False

LOG2E = 1.4426950408889634


if _GLUON_OK:

    @gluon.constexpr_function
    def _nvmma_2d(rows, cols, dtype):
        """The 2-D shared layout a TMA-loaded ``[1, rows, cols]`` box is viewed with by wgmma."""
        return gl.NVMMASharedLayout.get_default_for([rows, cols], dtype)

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, qk_scale, start_n, mask_from, rows, seqlen_k, shift,
                      CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """Online-softmax step on raw scores ``s [BLOCK_M, BLOCK_N]`` (fp32, wgmma layout).

        Returns p (fp32, unnormalised, base 2), alpha (rescale of the old state), m_new, l_new.
        Tiles starting at or after ``mask_from`` keys may hold invisible keys (causal diagonal, the
        zero-filled tail past seqlen_k): only those pay for the mask.
        """
        if start_n + BLOCK_N > mask_from:
            cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            visible = gl.expand_dims(cols, 0) < seqlen_k
            if CAUSAL:
                visible = visible & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows + shift, 1))
            s = gl.where(visible, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        # A row that has seen no visible key keeps m = -inf: subtract 0 so 2^(-inf - -inf) is not NaN.
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_sub)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_sub, 1))
        l_new = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_new

    @gluon.jit
    def _key_tiles(m0, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """(n_tiles, mask_from) of the query tile at row m0: its keys are [0, n_tiles * BLOCK_N) and those
        >= mask_from may be invisible to some row. At least one tile: a tile with no visible key is fully
        masked and yields zeros / LSE -inf."""
        hi = seqlen_k
        mask_from = seqlen_k
        if CAUSAL:
            shift = seqlen_k - seqlen_q
            hi = gl.minimum(hi, m0 + BLOCK_M + shift)
            mask_from = gl.minimum(mask_from, m0 + shift + 1)
        return gl.maximum(gl.cdiv(hi, BLOCK_N), 1), mask_from

    @gluon.jit
    def _issue_kv(desc, bufs, bars, it, j, n_tiles, batch, kv_col, STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
        """TMA of key tile ``j`` (K or V) of the current work item into ring slot ``(it + j) % STAGES``
        (``it`` = key tiles of earlier work items of this program); no-op when j >= n_tiles."""
        slot = (it + j) % STAGES
        ok = j < n_tiles
        mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=ok)
        tma.async_load(desc, [batch, j * BLOCK_N, kv_col], bars.index(slot), bufs.index(slot),
                                        pred=ok)

    @gluon.jit
    def _work_item(w, it, item, q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bar, k_bars, v_bars,
                   stride_lb, stride_lh, stride_lt, seqlen_q, seqlen_k, group_size, num_heads, per_m, num_m,
                   qk_scale, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr, num_warps: gl.constexpr):
        """One work item (query tile, head, batch); ``it`` key tiles and ``item`` items were run before by
        this program (ring slots and mbarrier phases continue from there). Returns the item's key tiles."""
        dtype: gl.constexpr = q_desc.dtype
        # wgmma accumulator layouts: warps stacked along M (16 rows each), instruction N = tile width.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        smem2d: gl.constexpr = _nvmma_2d(BLOCK_N, HEAD_DIM, dtype)
        qsmem2d: gl.constexpr = _nvmma_2d(BLOCK_M, HEAD_DIM, dtype)
        q_op = q_smem.reinterpret(dtype, [BLOCK_M, HEAD_DIM], qsmem2d)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        shift = seqlen_k - seqlen_q
        start_m = num_m - 1 - w // per_m
        head = (w % per_m) % num_heads
        batch = (w % per_m) // num_heads
        m0 = start_m * BLOCK_M
        kv_col = (head // group_size) * HEAD_DIM
        n_tiles, mask_from = _key_tiles(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)

        # The previous work item is done with every slot and with Q's buffer (its O store has drained).
        gl.thread_barrier()
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_load(q_desc, [batch, m0, head * HEAD_DIM], q_bar, q_smem)
        for i in gl.static_range(STAGES):
            _issue_kv(k_desc, k_bufs, k_bars, it, i, n_tiles, batch, kv_col, STAGES, BLOCK_N)
            _issue_kv(v_desc, v_bufs, v_bars, it, i, n_tiles, batch, kv_col, STAGES, BLOCK_N)

        rows = m0 + gl.arange(0, BLOCK_M, layout=row_s)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)

        # Prologue: S_0 and its softmax.
        mbarrier.wait(q_bar, item & 1)
        mbarrier.wait(k_bars.index(it % STAGES), (it // STAGES) & 1)
        k_op = k_bufs.index(it % STAGES).reinterpret(dtype, [BLOCK_N, HEAD_DIM], smem2d).permute((1, 0))
        s_tok = warpgroup_mma(q_op, k_op, s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, 0, mask_from, rows, seqlen_k, shift,
                                           CAUSAL, BLOCK_N, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        # K_0's slot is free (S_0 completed in every warpgroup): refill it with K_STAGES.
        gl.thread_barrier()
        _issue_kv(k_desc, k_bufs, k_bars, it, STAGES, n_tiles, batch, kv_col, STAGES, BLOCK_N)

        for j in range(1, n_tiles):
            g = it + j
            slot = g % STAGES
            prev = (g - 1) % STAGES
            mbarrier.wait(k_bars.index(slot), (g // STAGES) & 1)
            k_op = k_bufs.index(slot).reinterpret(dtype, [BLOCK_N, HEAD_DIM], smem2d).permute((1, 0))
            s_tok = warpgroup_mma(q_op, k_op, s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_bars.index(prev), ((g - 1) // STAGES) & 1)
            v_op = v_bufs.index(prev).reinterpret(dtype, [BLOCK_N, HEAD_DIM], smem2d)
            o_tok = warpgroup_mma(p_op, v_op, acc, is_async=True)
            # Only S_j must be complete: the softmax below runs while P_{j-1} V_{j-1} is on the tensor cores.
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, j * BLOCK_N, mask_from, rows, seqlen_k,
                                               shift, CAUSAL, BLOCK_N, s_layout)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma_wait(0, deps=(o_tok,))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            # Every warpgroup is done with K_j and V_{j-1}: refill those slots STAGES tiles ahead.
            gl.thread_barrier()
            _issue_kv(k_desc, k_bufs, k_bars, it, j + STAGES, n_tiles, batch, kv_col, STAGES, BLOCK_N)
            _issue_kv(v_desc, v_bufs, v_bars, it, j - 1 + STAGES, n_tiles, batch, kv_col, STAGES, BLOCK_N)

        # Epilogue: the last P.V, normalisation, stores.
        g = it + n_tiles - 1
        mbarrier.wait(v_bars.index(g % STAGES), (g // STAGES) & 1)
        v_op = v_bufs.index(g % STAGES).reinterpret(dtype, [BLOCK_N, HEAD_DIM], smem2d)
        o_tok = warpgroup_mma(p_op, v_op, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(o_tok,))

        l_o = gl.convert_layout(l_i, row_o)
        empty = l_o == 0.0
        out = acc / gl.expand_dims(gl.where(empty, 1.0, l_o), 1)
        # Q's buffer is free now (every wgmma reading it has completed): stage O there for the TMA store.
        gl.thread_barrier()
        q_op.store(out.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        tma.async_store(o_desc, [batch, m0, head * HEAD_DIM], q_smem)
        if WRITE_LSE:
            m_o = gl.convert_layout(m_i, row_o)
            lse = gl.where(empty, float("-inf"),
                           (m_o + gl.log2(gl.where(empty, 1.0, l_o))) * 0.6931471805599453)
            offs = m0 + gl.arange(0, BLOCK_M, layout=row_o)
            base = LSE + batch.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh
            gl.store(base + offs.to(gl.int64) * stride_lt, lse, mask=offs < seqlen_q)
        tma.store_wait(pendings=0)
        return n_tiles

    # Sequence lengths and LSE strides are not specialised (one binary per head_dim/dtype/mask/config).
    @gluon.jit(do_not_specialize=["stride_lb", "stride_lh", "stride_lt", "seqlen_q", "seqlen_k", "group_size",
                                  "num_heads", "num_items"])
    def _attn_fwd_hopper_kernel(q_desc, k_desc, v_desc, o_desc, LSE,
                                stride_lb, stride_lh, stride_lt,
                                seqlen_q, seqlen_k, group_size, num_heads, num_items, qk_scale,
                                HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr,
                                PERSISTENT: gl.constexpr, num_warps: gl.constexpr):
        """Work items w = (query tile, head, batch), query tile major and heaviest first. A grid of
        num_items programs runs one each; a smaller (persistent) grid strides over them."""
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_M, HEAD_DIM], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
        fence_async_shared()

        num_m = gl.cdiv(seqlen_q, BLOCK_M)
        per_m = num_items // num_m  # heads x batch
        if PERSISTENT:
            it = 0  # key tiles consumed so far by this program: ring slot and mbarrier phase of every load
            item = 0
            for w in range(gl.program_id(0), num_items, gl.num_programs(0)):
                n = _work_item(w, it, item, q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bar,
                               k_bars, v_bars, stride_lb, stride_lh, stride_lt, seqlen_q, seqlen_k, group_size,
                               num_heads, per_m, num_m, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL,
                               WRITE_LSE, num_warps)
                it += n
                item += 1
        else:
            _work_item(gl.program_id(0), 0, 0, q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_bufs, v_bufs, q_bar,
                       k_bars, v_bars, stride_lb, stride_lh, stride_lt, seqlen_q, seqlen_k, group_size,
                       num_heads, per_m, num_m, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL,
                       WRITE_LSE, num_warps)

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))

_GL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"} if _GLUON_OK else {}


def _gl_dtype(dtype: torch.dtype):
    return gl.float16 if dtype == torch.float16 else gl.bfloat16


@functools.lru_cache(maxsize=None)
def _layout(block: tuple, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), _gl_dtype(dtype))


def _aligned(t: torch.Tensor) -> bool:
    st = t.stride()
    es = t.element_size()
    return (st[3] == 1 and st[2] == t.shape[3] and t.data_ptr() % 16 == 0
            and (st[0] * es) % 16 == 0 and (st[1] * es) % 16 == 0)


@functools.lru_cache(maxsize=None)
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def hopper_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None, *,
                     cu_seqlens_q=None, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                     alibi_slopes=None) -> bool:
    """True when the Gluon kernel can run this call: sm_90 exactly, dense 4-D fp16/bf16 inputs, head_dim
    in HEAD_DIMS, causal (window (-1, 0)) or full attention, no softcap/ALiBi, TMA-compatible strides."""
    if not _GLUON_OK or not q.is_cuda or cu_seqlens_q is not None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if softcap > 0 or alibi_slopes is not None or window_left >= 0 or window_right > 0:
        return False
    if q.dtype not in _GL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    d = q.shape[-1]
    if d not in HEAD_DIMS or k.shape[-1] != d or v.shape[-1] != d or q.shape[2] % k.shape[2]:
        return False
    if q.shape[1] == 0 or k.shape[1] == 0 or q.shape[0] == 0:
        return False
    if out is not None and (out.dtype != q.dtype or out.shape != q.shape or not _aligned(out)):
        return False
    if not (_aligned(q) and _aligned(k) and _aligned(v)):
        return False
    return _is_sm90(q.get_device())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index) -> int:
    return torch.cuda.get_device_properties(device_index if device_index is not None else 0).multi_processor_count


def _desc_spec(t: torch.Tensor, block_rows: int) -> tuple:
    """The TMA descriptor over the 3-D view ``[b, s, h*d]`` of a ``[b, s, h, d]`` tensor with box
    ``[1, block_rows, d]``, as `tma_launch` takes it: (tensor, global shape, global strides, box, layout)."""
    b, s, h, d = t.shape
    st = t.stride()
    block = (1, block_rows, d)
    return t, [b, s, h * d], [st[0], st[1], 1], block, _layout(block, t.dtype)


def attention_fwd_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor | None, softmax_scale: float, causal: bool,
                         config: str | None = None):
    """Launch the Gluon sm_90 kernel (callers check `hopper_supported` first).

    q ``[b, sq, hq, d]``, k/v ``[b, sk, hk, d]``, out like q (written), lse ``[b, hq, sq]`` float32
    natural-log (written when given; any strides). ``config`` names an entry of CONFIGS or WS_CONFIGS
    (ValueError for a ws3 config at a head dim other than 64).
    Returns the CompiledKernel (``n_regs``, ``n_spills``, ``metadata.shared``). Repeats of a launch
    configuration skip Triton's launch path (`pagoda.kernels.launch.tma`; PAGODA_GLUON_FAST_LAUNCH=0 turns
    that off).
    """
    with device_of((q,)):   # TMA descriptors and the launch on q's device, whichever device is current
        return _launch_hopper(q, k, v, out, lse, softmax_scale, causal, config)


def _gluon_launch(kernel, grid, descs, args, constexprs, num_warps, maxnreg, lse_or_out):
    """`pagoda.kernels.launch.tma.tma_launch` keyed by everything the compiled kernel depends on: the kernel,
    the dtype and box of each descriptor, every constexpr and the register cap, the LSE pointer's 16-byte
    alignment (q/k/v/out are 16-byte aligned: `hopper_supported`) and the device."""
    key = (kernel, descs[0][0].dtype, descs[0][3], descs[1][3], *constexprs.values(), num_warps, maxnreg,
           lse_or_out.data_ptr() % 16 == 0, lse_or_out.get_device())
    return tma_launch(key, kernel, grid, descs, args, constexprs, num_warps, maxnreg)


def _pws_programs(items: int, num_m: int, causal: bool, most: int) -> int:
    """Programs of a persistent ws launch: at most ``most`` and ``items``; under a causal mask coprime with
    ``num_m`` (query tiles per head), so that each program's items (w, w + P, ...: `attention_hopper_pws`)
    take every tile height in turn instead of the same one or two."""
    p = min(items, most)
    while causal and p > 1 and math.gcd(p, num_m) != 1:
        p -= 1
    return p


def _launch_hopper(q, k, v, out, lse, softmax_scale, causal, config):
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    config = config or default_config(d, causal, sk)
    lse_or_out = lse if lse is not None else out
    ls = lse.stride() if lse is not None else (0, 0, 0)
    if config in WS_CONFIGS:
        bm, bn, stages, regs, pingpong, nc, maxnreg = _ws_params(config, d)
        # One 64-row Q/O box per consumer warpgroup; 4 warps = consumer 0 (the others are partitions).
        descs = (_desc_spec(q, 64), _desc_spec(k, bn), _desc_spec(v, bn), _desc_spec(out, 64))
        constexprs = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, CAUSAL=bool(causal),
                          WRITE_LSE=lse is not None, CONSUMER_REGS=regs, PINGPONG=pingpong, NUM_CONSUMERS=nc)
        if _ws_persistent(config):  # a few programs per SM (at most), striding over the work items
            from pagoda.kernels.hopper.pws import _attn_fwd_hopper_pws_kernel
            items = (sq + bm - 1) // bm * hq * b
            programs = _pws_programs(items, (sq + bm - 1) // bm, causal,
                                     _num_sms(q.device.index) * WS_CTAS_PER_SM.get(config, 1))
            args = (lse_or_out, *ls, sq, sk, hq // hk, hq, items, softmax_scale * LOG2E)
            return _gluon_launch(_attn_fwd_hopper_pws_kernel, (programs,), descs, args, constexprs, 4,
                                 maxnreg, lse_or_out)
        from pagoda.kernels.hopper.ws import _attn_fwd_hopper_ws_kernel
        args = (lse_or_out, *ls, sq, sk, hq // hk, softmax_scale * LOG2E)
        return _gluon_launch(_attn_fwd_hopper_ws_kernel, ((sq + bm - 1) // bm, hq, b), descs, args, constexprs, 4,
                             maxnreg, lse_or_out)
    bm, bn, stages, warps = CONFIGS[config]
    items = (sq + bm - 1) // bm * hq * b
    grid = (min(items, _num_sms(q.device.index)) if config.startswith("p-") else items,)
    descs = (_desc_spec(q, bm), _desc_spec(k, bn), _desc_spec(v, bn), _desc_spec(out, bm))
    args = (lse_or_out, *ls, sq, sk, hq // hk, hq, items, softmax_scale * LOG2E)
    constexprs = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, CAUSAL=bool(causal),
                      WRITE_LSE=lse is not None, PERSISTENT=config.startswith("p-"))
    return _gluon_launch(_attn_fwd_hopper_kernel, grid, descs, args, constexprs, warps, None, lse_or_out)

"""Host launch of the warp-specialised Gluon sm_90 attention forward (`ws`, persistent `pws`) on dense batches.

Scope: q ``[b, sq, hq, d]``, k/v ``[b, sk, hk, d]`` (hq a multiple of hk), fp16/bf16, head_dim 64 or 128, causal
(bottom-right aligned, as flash-attn 2) or not (`hopper_supported`). Everything else (windows, ALiBi, soft cap,
varlen, other head dims) takes the Triton kernel, `pagoda.kernels.attention.fwd`; `pagoda.ops._dispatch` decides.

Each work item is one BLOCK_M tile of queries of one (batch, head); the kernels stream its keys in BLOCK_N tiles
through a ring of TMA-filled shared-memory slots, with the online softmax of tile j on the CUDA cores while the
tensor cores run tile j-1's P.V GEMM (FA3's overlap). Scores stay in base 2: max over the raw products, then
``p = 2^(qk * scale*log2e - m)`` (one FMA before ex2). Which configuration (tile, consumer warpgroups, ping-pong,
persistent grid) a call takes depends on its head_dim, mask and length: `configs.default_config`.

Descriptors: host-side TMA descriptors over the 3-D views ``[b, s, h*d]`` with ``[1, BLOCK, d]`` boxes. The
sequence axis is its own descriptor dimension, so reads past a sequence's end are zero-filled (never the next
batch's rows) and the output store is clipped at ``sq``. This needs ``stride(2) == d``, a contiguous last dim and
16-byte aligned strides and bases (checked by `hopper_supported`).
"""
from __future__ import annotations

import math

import torch

from pagoda.kernels._common import LOG2E, sm_count
from pagoda.kernels.hopper.configs import HEAD_DIMS, WS_CTAS_PER_SM, default_config, ws_params, ws_persistent
from pagoda.kernels.hopper.gluon import GL_DTYPES, GLUON_OK, is_sm90, smem_layout
from pagoda.kernels.launch.fast import device_of
from pagoda.kernels.launch.tma import tma_launch


def _aligned(t: torch.Tensor) -> bool:
    st = t.stride()
    es = t.element_size()
    return (st[3] == 1 and st[2] == t.shape[3] and t.data_ptr() % 16 == 0
            and (st[0] * es) % 16 == 0 and (st[1] * es) % 16 == 0)


def hopper_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None, *,
                     cu_seqlens_q=None, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                     alibi_slopes=None) -> bool:
    """True when the Gluon kernel can run this call: sm_90 exactly, dense 4-D fp16/bf16 inputs, head_dim
    in HEAD_DIMS, causal (window (-1, 0)) or full attention, no softcap/ALiBi, TMA-compatible strides."""
    if not GLUON_OK or not q.is_cuda or cu_seqlens_q is not None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if softcap > 0 or alibi_slopes is not None or window_left >= 0 or window_right > 0:
        return False
    if q.dtype not in GL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
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
    return is_sm90(q.get_device())


def _desc_spec(t: torch.Tensor, block_rows: int) -> tuple:
    """The TMA descriptor over the 3-D view ``[b, s, h*d]`` of a ``[b, s, h, d]`` tensor with box
    ``[1, block_rows, d]``, as `tma_launch` takes it: (tensor, global shape, global strides, box, layout)."""
    b, s, h, d = t.shape
    st = t.stride()
    block = (1, block_rows, d)
    return t, [b, s, h * d], [st[0], st[1], 1], block, smem_layout(block, t.dtype)


def attention_fwd_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor | None, softmax_scale: float, causal: bool,
                         config: str | None = None):
    """Launch the Gluon sm_90 kernel (callers check `hopper_supported` first).

    q ``[b, sq, hq, d]``, k/v ``[b, sk, hk, d]``, out like q (written), lse ``[b, hq, sq]`` float32
    natural-log (written when given; any strides). ``config`` names an entry of `configs.WS_CONFIGS` (default:
    `configs.default_config`; ValueError for an unknown name or a head dim the config does not fit).
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
    ``num_m`` (query tiles per head), so that each program's items (w, w + P, ...: `pws`)
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
    bm, bn, stages, regs, pingpong, nc, maxnreg = ws_params(config, d)
    # One 64-row Q/O box per consumer warpgroup; 4 warps = consumer 0 (the others are partitions).
    descs = (_desc_spec(q, 64), _desc_spec(k, bn), _desc_spec(v, bn), _desc_spec(out, 64))
    constexprs = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, CAUSAL=bool(causal),
                      WRITE_LSE=lse is not None, CONSUMER_REGS=regs, PINGPONG=pingpong, NUM_CONSUMERS=nc)
    if ws_persistent(config):  # a few programs per SM (at most), striding over the work items
        from pagoda.kernels.hopper.pws import _attn_fwd_hopper_pws_kernel
        items = (sq + bm - 1) // bm * hq * b
        programs = _pws_programs(items, (sq + bm - 1) // bm, causal,
                                 sm_count(q.device.index) * WS_CTAS_PER_SM.get(config, 1))
        args = (lse_or_out, *ls, sq, sk, hq // hk, hq, items, softmax_scale * LOG2E)
        return _gluon_launch(_attn_fwd_hopper_pws_kernel, (programs,), descs, args, constexprs, 4,
                             maxnreg, lse_or_out)
    from pagoda.kernels.hopper.ws import _attn_fwd_hopper_ws_kernel
    args = (lse_or_out, *ls, sq, sk, hq // hk, softmax_scale * LOG2E)
    return _gluon_launch(_attn_fwd_hopper_ws_kernel, ((sq + bm - 1) // bm, hq, b), descs, args, constexprs, 4,
                         maxnreg, lse_or_out)

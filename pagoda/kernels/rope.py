"""Rotary position embedding over ragged q/k: one program per (token, block of heads).

The pair frequencies (plain RoPE or Llama 3.1 scaled) are computed once on the device by the ops
layer and passed in as a float32 ``[rotary_dim / 2]`` vector, so one kernel serves every variant.
Per pair ``(x1, x2)`` at angle ``a = pos * freq``: ``(x1 cos a - x2 sin a, x2 cos a + x1 sin a)``,
math in float32. Dimensions past ``rotary_dim`` are copied (or left alone when in place).
"""
from __future__ import annotations

import triton
import triton.language as tl

from pagoda.kernels.launch.fast import cdiv, launch, next_pow2


@triton.jit
def _rotate_heads(x_row, o_row, cos, sin, offs_i, half, head_dim, hmask, mask, REST_PAD: tl.constexpr,
                  INTERLEAVE: tl.constexpr, COPY_REST: tl.constexpr):
    """One token's block of heads: ``x_row``/``o_row`` ``[BLOCK_H, 1]`` pointers to each head's first element,
    ``cos``/``sin`` float32 ``[1, HALF_PAD]``; pair i is (2i, 2i + 1) interleaved, else (i, i + half). Writes
    ``(x1 cos - x2 sin, x2 cos + x1 sin)`` and, with COPY_REST, the dimensions past ``2 * half`` unchanged."""
    if INTERLEAVE:
        d1 = 2 * offs_i
        d2 = 2 * offs_i + 1
    else:
        d1 = offs_i
        d2 = offs_i + half
    x1 = tl.load(x_row + d1[None, :], mask=mask).to(tl.float32)
    x2 = tl.load(x_row + d2[None, :], mask=mask).to(tl.float32)
    tl.store(o_row + d1[None, :], (x1 * cos - x2 * sin).to(o_row.dtype.element_ty), mask=mask)
    tl.store(o_row + d2[None, :], (x2 * cos + x1 * sin).to(o_row.dtype.element_ty), mask=mask)
    if COPY_REST:
        offs_r = 2 * half + tl.arange(0, REST_PAD)
        rmask = hmask[:, None] & (offs_r[None, :] < head_dim)
        tl.store(o_row + offs_r[None, :], tl.load(x_row + offs_r[None, :], mask=rmask), mask=rmask)


@triton.jit
def _rope_kernel(
    X, OUT, POS, FREQS,
    stride_xt, stride_xh, stride_ot, stride_oh,
    num_heads, head_dim, half,
    HALF_PAD: tl.constexpr, REST_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVE: tl.constexpr, COPY_REST: tl.constexpr,
):
    tok = tl.program_id(0)
    offs_h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)   # head-major views: s * d strides
    offs_i = tl.arange(0, HALF_PAD)
    hmask = offs_h < num_heads
    imask = offs_i < half
    mask = hmask[:, None] & imask[None, :]

    pos = tl.load(POS + tok).to(tl.float32)
    freq = tl.load(FREQS + offs_i, mask=imask, other=0.0)
    angle = pos * freq
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]
    tok64 = tok.to(tl.int64)
    _rotate_heads(X + tok64 * stride_xt + offs_h[:, None] * stride_xh,
                  OUT + tok64 * stride_ot + offs_h[:, None] * stride_oh,
                  cos, sin, offs_i, half, head_dim, hmask, mask, REST_PAD, INTERLEAVE, COPY_REST)


def rope_fwd(x, out, pos, freqs, interleave: bool) -> None:
    """Rotate ``x [nnz, H, D]`` into ``out`` (may be ``x`` itself: in place) at int positions ``pos [nnz]``
    with float32 ``freqs [rotary_dim // 2]``. Last dims must be contiguous; validated by `pagoda.ops.rope`."""
    nnz, heads, dim = x.shape
    if nnz == 0 or heads == 0:
        return
    half = freqs.shape[0]
    half_pad = max(1, next_pow2(half))
    rest = dim - 2 * half
    copy_rest = rest > 0 and out.data_ptr() != x.data_ptr()
    block_h = max(1, min(next_pow2(heads), max(1, 2048 // half_pad)))
    grid = (nnz, cdiv(heads, block_h))
    launch(
        _rope_kernel, grid,
        x, out, pos, freqs, x.stride(0), x.stride(1), out.stride(0), out.stride(1), heads, dim, half,
        HALF_PAD=half_pad, REST_PAD=max(1, next_pow2(max(rest, 1))), BLOCK_H=block_h,
        INTERLEAVE=bool(interleave), COPY_REST=copy_rest, num_warps=4,
    )

"""Rotary embedding from precomputed cos/sin tables: one program per (token, block of heads).

The layouts vLLM, SGLang and flash-attn keep: ``cos[pos, i]`` and ``sin[pos, i]`` for rotary pair ``i``
(``0 <= i < rotary_dim / 2``), read from two row-strided tables (FlashInfer's ``cos_sin_cache`` is one table whose
first half of each row is cos and second half sin: the same kernel with the sin pointer offset by ``rotary_dim/2``).
Per pair ``(x1, x2)``: ``(x1 cos - x2 sin, x2 cos + x1 sin)`` in float32. A position outside ``[0, table_len)``
rotates by 0 (cos 1, sin 0), as flash-attn's kernel does, so no read leaves the tables. Tokens are addressed as
``(outer, inner)`` pairs (``tok // inner``, ``tok % inner``) so a ``[batch, seqlen, heads, dim]`` tensor with any
strides needs no copy. Dimensions past ``rotary_dim`` are copied (or left alone in place).
"""
from __future__ import annotations

import triton
import triton.language as tl

from pagoda.kernels.launch.fast import cdiv, launch, next_pow2
from pagoda.kernels.rope import _rotate_heads


@triton.jit
def _rope_table_kernel(
    X, OUT, POS, COS, SIN,
    stride_xo, stride_xi, stride_xh, stride_oo, stride_oi, stride_oh, stride_cos, stride_sin,
    inner, num_heads, head_dim, half, table_len,
    HALF_PAD: tl.constexpr, REST_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVE: tl.constexpr, COPY_REST: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    outer = tok // inner
    row = tok - outer * inner
    offs_h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    offs_i = tl.arange(0, HALF_PAD)
    hmask = offs_h < num_heads
    imask = offs_i < half
    mask = hmask[:, None] & imask[None, :]

    pos = tl.load(POS + tok).to(tl.int64)
    inside = (pos >= 0) & (pos < table_len)
    row_c = tl.where(inside, pos, 0)   # an outside position reads row 0, then rotates by 0
    cos = tl.load(COS + row_c * stride_cos + offs_i, mask=imask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + row_c * stride_sin + offs_i, mask=imask, other=0.0).to(tl.float32)
    cos = tl.where(inside, cos, 1.0)[None, :]
    sin = tl.where(inside, sin, 0.0)[None, :]
    _rotate_heads(X + outer * stride_xo + row * stride_xi + offs_h[:, None] * stride_xh,
                  OUT + outer * stride_oo + row * stride_oi + offs_h[:, None] * stride_oh,
                  cos, sin, offs_i, half, head_dim, hmask, mask, REST_PAD, INTERLEAVE, COPY_REST)

def rope_table_fwd(x, out, pos, cos, sin, interleave: bool) -> None:
    """Rotate ``x [outer, inner, H, D]`` (any strides, last dim contiguous) into ``out`` (same shape; may be ``x``:
    in place) at int positions ``pos [outer * inner]`` (contiguous) with table rows ``cos[pos]``, ``sin[pos]``
    (``[table_len, rotary_dim / 2]`` views, last dim contiguous). Validated by the ops (`pagoda.ops.rope_table`)."""
    outer, inner, heads, dim = x.shape
    half = cos.shape[1]
    if outer * inner == 0 or heads == 0 or half == 0 or cos.shape[0] == 0:
        if out.data_ptr() != x.data_ptr() and x.numel():
            out.copy_(x)
        return
    half_pad = max(1, next_pow2(half))
    rest = dim - 2 * half
    copy_rest = rest > 0 and out.data_ptr() != x.data_ptr()
    block_h = max(1, min(next_pow2(heads), max(1, 2048 // half_pad)))
    grid = (outer * inner, cdiv(heads, block_h))
    launch(
        _rope_table_kernel, grid,
        x, out, pos, cos, sin, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0), sin.stride(0), inner, heads, dim, half, cos.shape[0],
        HALF_PAD=half_pad, REST_PAD=max(1, next_pow2(max(rest, 1))), BLOCK_H=block_h,
        INTERLEAVE=bool(interleave), COPY_REST=copy_rest, num_warps=4,
    )

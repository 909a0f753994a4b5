"""RMSNorm over rows, optionally fused with the residual add: one program per block of rows.

A row is ``hidden`` contiguous elements; row ``r`` lives at ``(r // inner) * stride0 + (r % inner) * stride1``,
so any tensor whose leading dimensions collapse to at most two strided ones is read in place (a ``[tokens,
heads, head_dim]`` slice of a fused QKV output included). Up to ``MAX_TILE`` elements the whole row is one
register tile (loaded once; small rows are packed several to a program); longer rows are walked in
``CHUNK``-sized pieces twice, the sum of squares first, the scaling second (the second read hits L2).

Math in float32; the rounding points are those of `pagoda.reference.norm` (HF's): the fused form rounds
``residual + input`` to the dtype, stores it, and normalises that stored value; the plain form rounds the
normalised row before multiplying by ``weight`` (``GEMMA``: one rounding after ``* (1 + weight)``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from pagoda.kernels.launch.fast import cdiv, launch, next_pow2

MAX_TILE = 16384       # longest row held in registers as one tile (fp32: 32 values a thread at 16 warps)
CHUNK = 4096           # piece of a longer row per loop step
TILE_ELEMS = 4096      # rows per program: up to this many elements in a tile (short rows are packed)


@triton.jit
def _scale(x, w, rrms, GEMMA: tl.constexpr, dtype: tl.constexpr):
    """The normalised, weighted row in ``dtype``: ``x`` float32 ``[R, C]``, ``w`` float32 ``[C]``, ``rrms`` ``[R]``."""
    y = x * rrms[:, None]
    if GEMMA:
        y = y * (1.0 + w[None, :])
    else:
        y = y.to(dtype).to(tl.float32) * w[None, :]   # HF: weight * normed.to(dtype)
    return y.to(dtype)


@triton.jit
def _rmsnorm_kernel(
    X, R, W, OUT,
    n_rows, inner, hidden,
    sx0, sx1, sr0, sr1, so0, so1,
    eps,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, ONE_TILE: tl.constexpr,
    FUSED_ADD: tl.constexpr, GEMMA: tl.constexpr,
):
    dtype = OUT.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rows = rows.to(tl.int64)
    r0 = rows // inner
    r1 = rows % inner
    x_row = (r0 * sx0 + r1 * sx1)[:, None]
    o_row = (r0 * so0 + r1 * so1)[:, None]
    if FUSED_ADD:
        res_row = (r0 * sr0 + r1 * sr1)[:, None]
    cols = tl.arange(0, BLOCK_H)
    if ONE_TILE:
        cmask = cols < hidden
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if FUSED_ADD:
            s = (x + tl.load(R + res_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)).to(dtype)
            tl.store(R + res_row + cols[None, :], s, mask=mask)
            x = s.to(tl.float32)
        rrms = tl.math.rsqrt(tl.sum(x * x, axis=1) / hidden + eps)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(OUT + o_row + cols[None, :], _scale(x, w, rrms, GEMMA, dtype), mask=mask)
    else:
        # BLOCK_R == 1 here. Pass 1: sum of squares (storing residual + input for the fused form).
        acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_H):
            c = start + cols
            mask = rmask[:, None] & (c < hidden)[None, :]
            x = tl.load(X + x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if FUSED_ADD:
                s = (x + tl.load(R + res_row + c[None, :], mask=mask, other=0.0).to(tl.float32)).to(dtype)
                tl.store(R + res_row + c[None, :], s, mask=mask)
                x = s.to(tl.float32)
            acc += x * x
        rrms = tl.math.rsqrt(tl.sum(acc, axis=1) / hidden + eps)
        # The second pass reads back what this program stored (same layout, so the same threads); the barrier
        # keeps that true whatever layout the compiler picks.
        tl.debug_barrier()
        for start in range(0, hidden, BLOCK_H):
            c = start + cols
            cmask = c < hidden
            mask = rmask[:, None] & cmask[None, :]
            if FUSED_ADD:
                x = tl.load(R + res_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
            tl.store(OUT + o_row + c[None, :], _scale(x, w, rrms, GEMMA, dtype), mask=mask)


def _config(n_rows: int, hidden: int) -> tuple[int, int, bool, int]:
    """``(BLOCK_R, BLOCK_H, ONE_TILE, num_warps)`` for rows of ``hidden`` elements."""
    if hidden > MAX_TILE:
        return 1, CHUNK, False, 8
    block_h = next_pow2(hidden)
    block_r = max(1, min(TILE_ELEMS // block_h, next_pow2(n_rows)))
    tile = block_r * block_h
    return block_r, block_h, True, min(16, max(4, tile // 512))


def rmsnorm_fwd(x, weight, out, eps: float, gemma: bool, layout, residual=None) -> None:
    """Normalise the rows of ``x`` into ``out`` (``residual``: first ``residual += x``, rounded, stored).

    ``layout``: ``(n_rows, inner, hidden, (sx0, sx1), (so0, so1), (sr0, sr1))`` in elements (see the module
    docstring; the residual's strides are ignored without ``residual``). Last dimensions contiguous,
    ``weight`` contiguous ``[hidden]``; ``out`` may be ``x`` itself. Validated by `pagoda.ops.norm`."""
    n_rows, inner, hidden, (sx0, sx1), (so0, so1), (sr0, sr1) = layout
    if n_rows == 0:
        return
    block_r, block_h, one_tile, num_warps = _config(n_rows, hidden)
    fused = residual is not None
    launch(
        _rmsnorm_kernel, (cdiv(n_rows, block_r),),
        x, residual if fused else x, weight, out, n_rows, inner, hidden, sx0, sx1, sr0, sr1, so0, so1, float(eps),
        BLOCK_R=block_r, BLOCK_H=block_h, ONE_TILE=one_tile, FUSED_ADD=fused, GEMMA=bool(gemma),
        num_warps=num_warps,
    )

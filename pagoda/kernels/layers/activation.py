"""Gated activation ``act(gate) * up`` over rows ``[gate | up]`` of ``2 * d`` elements: one program per tile of
``BLOCK_R`` rows x ``BLOCK_C`` columns, so a single decode row still spreads over many SMs.

Math in float32; ``act(gate)`` is rounded to the output dtype before the product, as HF's MLPs round it
(`pagoda.reference.activation`). GELU-tanh uses ``0.5 * (1 + tanh(z)) == sigmoid(2z)``, which has no
cancellation for large negative inputs.
"""
from __future__ import annotations

import triton
import triton.language as tl

from pagoda.kernels.launch.fast import cdiv, launch, next_pow2

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
SMALL_WORK = 1 << 16    # outputs below this: narrow tiles, to spread a few rows over more programs


@triton.jit
def _act_and_mul_kernel(
    X, OUT, n_rows, d, sx, so,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < d)[None, :]
    rows = rows.to(tl.int64)
    x_ptr = X + (rows * sx)[:, None] + cols[None, :]
    g = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + d, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g / (1.0 + tl.exp(-2.0 * z))
    dtype = OUT.dtype.element_ty
    y = a.to(dtype).to(tl.float32) * u
    tl.store(OUT + (rows * so)[:, None] + cols[None, :], y.to(dtype), mask=mask)


def _config(n_rows: int, d: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)``."""
    block_c = min(next_pow2(d), 512 if n_rows * d <= SMALL_WORK else 2048)
    block_r = max(1, min(4096 // block_c, next_pow2(n_rows)))
    return block_r, block_c, 4 if block_r * block_c <= 2048 else 8


def act_and_mul_fwd(x, out, activation: str, n_rows: int, d: int, sx: int, so: int) -> None:
    """``out[r, i] = act(x[r, i]) * x[r, d + i]`` for ``n_rows`` rows at element strides ``sx`` / ``so`` (last
    dimensions contiguous; validated by `pagoda.ops.activation`)."""
    if n_rows == 0 or d == 0:
        return
    block_r, block_c, num_warps = _config(n_rows, d)
    launch(
        _act_and_mul_kernel, (cdiv(n_rows, block_r), cdiv(d, block_c)),
        x, out, n_rows, d, sx, so,
        BLOCK_R=block_r, BLOCK_C=block_c, ACT=ACT_CODES[activation], num_warps=num_warps,
    )

"""Row layouts of the per-token layer ops (`norm`, `activation`): a tensor ``[..., n]`` seen as rows of ``n``
contiguous elements, row ``r`` at element offset ``(r // inner) * s0 + (r % inner) * s1``.

Leading dimensions of size 1 are dropped and adjacent ones that step evenly merged; a tensor whose leading
dimensions then number at most two is described without a copy (a contiguous batch, a row-strided slice, a
``[tokens, heads, head_dim]`` view into a fused projection). Several tensors of one leading shape share one
``(n_rows, inner)`` split, each with its own strides.
"""
from __future__ import annotations

import math

import torch


def _collapse(t: torch.Tensor) -> list[list[int]]:
    """Leading dimensions of ``t`` as ``[size, stride]`` pairs, size-1 ones dropped, even steps merged."""
    if t.dim() == 2:            # the common [tokens, hidden] case, on every call of a layer op: no loop
        n = t.shape[0]
        return [[n, t.stride(0)]] if n != 1 else []
    dims: list[list[int]] = []
    for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True):
        if n == 1:
            continue
        if dims and dims[-1][1] == s * n:
            dims[-1] = [dims[-1][0] * n, s]
        else:
            dims.append([n, s])
    return dims


def layout(tensors: tuple[torch.Tensor, ...]) -> tuple[int, int, list[tuple[int, int] | None]]:
    """``(n_rows, inner, strides)`` for tensors of one leading shape: ``strides[i] = (s0, s1)`` of tensor i, or
    None where that tensor does not fit the shared split (its leading dimensions do not collapse to at most two,
    or to another two than the first tensor with two)."""
    n_rows = math.prod(tensors[0].shape[:-1])
    collapsed = [_collapse(t) for t in tensors]
    split = next((c for c in collapsed if len(c) == 2), None)
    inner = split[1][0] if split is not None else 1
    strides: list[tuple[int, int] | None] = []
    for dims in collapsed:
        if not dims:
            strides.append((0, 0))
        elif len(dims) == 1:
            strides.append((dims[0][1] * inner, dims[0][1]))
        elif len(dims) == 2 and split is not None and dims[0][0] == split[0][0] and dims[1][0] == inner:
            strides.append((dims[0][1], dims[1][1]))
        else:
            strides.append(None)
    return n_rows, inner, strides


def row_stride(t: torch.Tensor) -> int | None:
    """The one stride between consecutive rows of ``t`` (0 for a single row), or None when its leading
    dimensions do not collapse to one."""
    dims = _collapse(t)
    if len(dims) > 1:
        return None
    return dims[0][1] if dims else 0

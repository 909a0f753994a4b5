"""Plain-PyTorch rotary embedding from precomputed cos/sin tables (vLLM's ``cos_sin_cache``, flash-attn's cos/sin).

For a token at position ``p`` and rotary pair ``i`` (``0 <= i < rotary_dim / 2``), with ``c = cos[p, i]``,
``s = sin[p, i]``: ``(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)``. The pair is ``(x[i], x[i + rotary_dim/2])``
(Neox style, FlashInfer's ``is_neox=True`` / flash-attn's ``interleaved=False``) or ``(x[2i], x[2i+1])`` (GPT-J).
Dimensions past ``rotary_dim`` pass through. A position outside ``[0, len(cos))`` rotates by 0 (``c = 1, s = 0``),
as flash-attn's kernel does (FlashInfer would read past its table).
"""
from __future__ import annotations

import torch

from pagoda.reference.rope import rotate_pairs

__all__ = ["rotate_with_table"]


def rotate_with_table(x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
                      compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotate ``x [n, heads, head_dim]`` at int positions ``pos [n]`` with tables ``cos, sin [L, rotary_dim / 2]``;
    returns a new tensor of x's dtype (math in ``compute_dtype``)."""
    half = cos.shape[1]
    p = pos.to(torch.int64)
    inside = (p >= 0) & (p < cos.shape[0])
    if cos.shape[0]:
        idx = p.clamp(0, cos.shape[0] - 1)
        c = torch.where(inside[:, None], cos[idx].to(compute_dtype), 1.0)
        s = torch.where(inside[:, None], sin[idx].to(compute_dtype), 0.0)
    else:
        c = torch.ones(p.shape[0], half, dtype=compute_dtype, device=x.device)
        s = torch.zeros(p.shape[0], half, dtype=compute_dtype, device=x.device)
    return rotate_pairs(x, c[:, None, :], s[:, None, :], interleave, compute_dtype)

"""Plain-PyTorch rotary position embedding (FlashInfer's ``flashinfer.rope`` semantics).

For a token at position ``p`` and rotary pair ``i`` (``0 <= i < rotary_dim / 2``):

    freq_i  = rope_theta ** (-2 i / rotary_dim) / rope_scale
    (x1, x2) -> (x1 cos(p freq_i) - x2 sin(p freq_i),  x2 cos(p freq_i) + x1 sin(p freq_i))

The pair is ``(x[i], x[i + rotary_dim/2])`` (non-interleaved, "Neox"/Llama style) or
``(x[2i], x[2i+1])`` (``interleave=True``, GPT-J style). Dimensions past ``rotary_dim`` pass through.

Llama 3.1 scaling replaces ``freq_i`` (with ``rope_scale`` the context extension factor):
``s = clamp((old_context_len * f / (2 pi) - low) / (high - low), 0, 1)`` with the base frequency
``f = rope_theta ** (-2 i / rotary_dim)``, then ``freq_i = (1 - s) f / rope_scale + s f``
(so long wavelengths are slowed by ``rope_scale`` and short ones kept).
"""
from __future__ import annotations

import math

import torch

__all__ = ["rope_frequencies", "positions_from_indptr", "rope_ref", "apply_rope", "apply_rope_pos_ids",
           "apply_llama31_rope", "apply_llama31_rope_pos_ids"]


def rope_frequencies(rotary_dim: int, rope_scale: float, rope_theta: float, llama31: bool = False,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0, old_context_len: int = 8192,
                     dtype=torch.float64, device=None) -> torch.Tensor:
    """Angular frequency of each rotary pair, ``[rotary_dim // 2]``."""
    i = torch.arange(rotary_dim // 2, dtype=dtype, device=device)
    base = rope_theta ** (-2.0 * i / rotary_dim)
    if not llama31:
        return base / rope_scale
    if high_freq_factor != low_freq_factor:
        smooth = (old_context_len * base / (2 * math.pi) - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smooth = smooth.clamp(0.0, 1.0)
    else:
        # Degenerate band: a step at wavelength old_context_len / low_freq_factor.
        smooth = (2 * math.pi / base < old_context_len / low_freq_factor).to(dtype)
    return (1.0 - smooth) * base / rope_scale + smooth * base


def positions_from_indptr(indptr: torch.Tensor, offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """Position of each ragged token: ``offsets[b] + (t - indptr[b])`` for ``indptr[b] <= t < indptr[b+1]``
    (int64 ``[nnz]``; tokens past ``indptr[-1]`` get position 0)."""
    ptr = indptr.to(torch.int64)
    t = torch.arange(nnz, device=indptr.device)
    if ptr.shape[0] < 2:
        return torch.zeros(nnz, dtype=torch.int64, device=indptr.device)
    b = torch.searchsorted(ptr[1:], t, right=True).clamp(max=ptr.shape[0] - 2)
    pos = offsets.to(torch.int64)[b] + t - ptr[b]
    return torch.where(t < ptr[-1], pos, 0)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
                 compute_dtype=torch.float32) -> torch.Tensor:
    """Rotate ``x [nnz, heads, head_dim]`` by per-token angles given as ``cos``/``sin`` ``[nnz, 1, half]``: pair i
    is (2i, 2i + 1) interleaved, else (i, i + half); dimensions past ``2 * half`` unchanged. x's dtype."""
    half = cos.shape[-1]
    rd = 2 * half
    xc = x.to(compute_dtype)
    if interleave:
        x1, x2 = xc[..., 0:rd:2], xc[..., 1:rd:2]
    else:
        x1, x2 = xc[..., :half], xc[..., half:rd]
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    out = xc.clone()
    if interleave:
        out[..., 0:rd:2], out[..., 1:rd:2] = r1, r2
    else:
        out[..., :half], out[..., half:rd] = r1, r2
    return out.to(x.dtype)


def rope_ref(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, interleave: bool,
             compute_dtype=torch.float32) -> torch.Tensor:
    """Rotate ``x [nnz, heads, head_dim]`` at positions ``pos [nnz]`` with pair frequencies ``freqs``."""
    angle = pos.to(compute_dtype)[:, None] * freqs.to(compute_dtype)[None, :]   # [nnz, half]
    return rotate_pairs(x, torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :], interleave, compute_dtype)

def apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4,
                       compute_dtype=torch.float32):
    """Reference for `pagoda.apply_rope_pos_ids`: returns rotated copies ``(q_rope, k_rope)``."""
    rd = q.shape[-1] if rotary_dim is None else rotary_dim
    freqs = rope_frequencies(rd, rope_scale, rope_theta, device=q.device)
    return (rope_ref(q, pos_ids, freqs, interleave, compute_dtype),
            rope_ref(k, pos_ids, freqs, interleave, compute_dtype))


def apply_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4,
               compute_dtype=torch.float32):
    """Reference for `pagoda.apply_rope` (ragged positions from ``indptr`` and per-request ``offsets``)."""
    pos = positions_from_indptr(indptr, offsets, q.shape[0])
    return apply_rope_pos_ids(q, k, pos, rotary_dim, interleave, rope_scale, rope_theta, compute_dtype)


def apply_llama31_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8.0,
                               rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192,
                               compute_dtype=torch.float32):
    """Reference for `pagoda.apply_llama31_rope_pos_ids`."""
    rd = q.shape[-1] if rotary_dim is None else rotary_dim
    freqs = rope_frequencies(rd, rope_scale, rope_theta, True, low_freq_factor, high_freq_factor,
                             old_context_len, device=q.device)
    return (rope_ref(q, pos_ids, freqs, interleave, compute_dtype),
            rope_ref(k, pos_ids, freqs, interleave, compute_dtype))


def apply_llama31_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8.0, rope_theta=5e5,
                       low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192,
                       compute_dtype=torch.float32):
    """Reference for `pagoda.apply_llama31_rope`."""
    pos = positions_from_indptr(indptr, offsets, q.shape[0])
    return apply_llama31_rope_pos_ids(q, k, pos, rotary_dim, interleave, rope_scale, rope_theta,
                                      low_freq_factor, high_freq_factor, old_context_len, compute_dtype)

"""Rotary position embedding with FlashInfer's signatures (``flashinfer.rope``).

Semantics (pairs, frequencies, Llama 3.1 scaling): see `pagoda.reference.rope`. On CUDA the rotation
runs in a Triton kernel (cos/sin computed on the fly in float32); elsewhere in the reference.
The ``*_pos_ids`` forms never read tensor values on the host; the ragged forms check ``indptr`` on the
host (one small copy) except while a CUDA graph is being captured. All can be captured.
"""
from __future__ import annotations

import math
import operator

import torch

from pagoda.ops import _checks, _paged
from pagoda.reference import rope as _ref

__all__ = ["apply_rope", "apply_rope_inplace", "apply_rope_pos_ids", "apply_rope_pos_ids_inplace",
           "apply_llama31_rope", "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
           "apply_llama31_rope_pos_ids_inplace"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INTS = (torch.int32, torch.int64)


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_qk(q, k, rotary_dim, interleave, inplace: bool) -> int:
    for name, t in (("q", q), ("k", k)):
        _checks.check_tensor(name, t, ndim=3, dtypes=_FLOATS)
    _checks.check_same("q, k", (q, k), "dtype")
    _checks.check_same("q, k", (q, k), "device")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same number of tokens (nnz), got {q.shape[0]} and {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if inplace and (q.stride(-1) != 1 or k.stride(-1) != 1):
        raise ValueError("in-place RoPE needs q and k contiguous in the last (head_dim) dimension")
    if not isinstance(interleave, bool):
        raise TypeError(f"interleave must be a bool, got {type(interleave).__name__}")
    head_dim = q.shape[2]
    if rotary_dim is None:
        rotary_dim = head_dim
    try:
        rotary_dim = operator.index(rotary_dim)
    except TypeError:
        raise TypeError(f"rotary_dim must be an int or None, got {type(rotary_dim).__name__}") from None
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be an even int in 2..head_dim ({head_dim}), got {rotary_dim}")
    return rotary_dim


def _check_pos_ids(pos_ids, nnz: int, device) -> torch.Tensor:
    _checks.check_tensor("pos_ids", pos_ids, ndim=1, dtypes=_INTS)
    if pos_ids.shape[0] != nnz:
        raise ValueError(f"pos_ids must have length nnz = {nnz}, got {pos_ids.shape[0]}")
    if pos_ids.device != device:
        raise ValueError(f"pos_ids must be on {device}, got {pos_ids.device}")
    return pos_ids


def _indptr_positions(indptr, offsets, nnz: int, device) -> torch.Tensor:
    _checks.check_tensor("indptr", indptr, ndim=1, dtypes=_INTS)
    _checks.check_tensor("offsets", offsets, ndim=1, dtypes=_INTS)
    if indptr.shape[0] != offsets.shape[0] + 1:
        raise ValueError(f"indptr must have length len(offsets) + 1 = {offsets.shape[0] + 1}, got {indptr.shape[0]}")
    for name, t in (("indptr", indptr), ("offsets", offsets)):
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    if not (indptr.is_cuda and torch.cuda.is_current_stream_capturing()):
        ptr = indptr.tolist()
        if ptr[0] != 0 or any(b < a for a, b in zip(ptr, ptr[1:])):
            raise ValueError(f"indptr must start at 0 and be non-decreasing, got {ptr[:16]}")
        if ptr[-1] != nnz:
            raise ValueError(f"indptr[-1] = {ptr[-1]} must equal the number of tokens in q/k ({nnz})")
    return _ref.positions_from_indptr(indptr, offsets, nnz)


def _rotate(q, k, pos, freqs, interleave: bool, inplace: bool):
    """Dispatch: Triton on CUDA, the reference elsewhere. Returns (q_out, k_out) (q, k themselves in place)."""
    if not _paged.use_triton(q):
        qr = _ref.rope_ref(q, pos, freqs, interleave)
        kr = _ref.rope_ref(k, pos, freqs, interleave)
        if inplace:
            q.copy_(qr)
            k.copy_(kr)
            return q, k
        return qr, kr
    from pagoda.kernels.rope import rope_fwd

    freqs = freqs.to(device=q.device, dtype=torch.float32)
    outs = []
    for x in (q, k):
        if inplace:
            out = x
        else:
            x = x if x.stride(-1) == 1 else x.contiguous()
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
        rope_fwd(x, out, pos, freqs, interleave)
        outs.append(out)
    return tuple(outs)


def _run(q, k, pos_fn, rotary_dim, interleave, freq_args, inplace):
    rd = _check_qk(q, k, rotary_dim, interleave, inplace)
    pos = pos_fn()
    freqs = _ref.rope_frequencies(rd, *freq_args, device=q.device)
    out = _rotate(q, k, pos, freqs, interleave, inplace)
    return None if inplace else out


def _llama_args(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len):
    rope_scale = _positive("rope_scale", rope_scale)
    rope_theta = _positive("rope_theta", rope_theta)
    low = _positive("low_freq_factor", low_freq_factor)
    high = _positive("high_freq_factor", high_freq_factor)
    if high < low:
        raise ValueError(f"high_freq_factor ({high}) must be >= low_freq_factor ({low})")
    old = _positive("old_context_len", old_context_len)
    return rope_scale, rope_theta, True, low, high, old


def apply_rope_pos_ids(q: torch.Tensor, k: torch.Tensor, pos_ids: torch.Tensor, rotary_dim: int | None = None,
                       interleave: bool = False, rope_scale: float = 1, rope_theta: float = 1e4
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE at explicit positions; returns rotated copies ``(q_rope, k_rope)``.

    Args:
        q: ``[nnz, num_q_heads, head_dim]``; k: ``[nnz, num_k_heads, head_dim]``; fp16/bf16/fp32, same dtype.
        pos_ids: int32/int64 ``[nnz]`` position of each token.
        rotary_dim: rotate the first ``rotary_dim`` dims (even, <= head_dim); None = all.
        interleave: pairs ``(2i, 2i+1)`` (GPT-J) instead of ``(i, i + rotary_dim/2)`` (Neox/Llama).
        rope_scale: positions are divided by it (linear interpolation); rope_theta: frequency base.
    """
    return _run(q, k, lambda: _check_pos_ids(pos_ids, q.shape[0], q.device), rotary_dim, interleave,
                (_positive("rope_scale", rope_scale), _positive("rope_theta", rope_theta)), False)


def apply_rope_pos_ids_inplace(q: torch.Tensor, k: torch.Tensor, pos_ids: torch.Tensor, rotary_dim: int | None = None,
                               interleave: bool = False, rope_scale: float = 1, rope_theta: float = 1e4) -> None:
    """In-place `apply_rope_pos_ids` (q and k are overwritten; returns None)."""
    _run(q, k, lambda: _check_pos_ids(pos_ids, q.shape[0], q.device), rotary_dim, interleave,
         (_positive("rope_scale", rope_scale), _positive("rope_theta", rope_theta)), True)


def apply_rope(q: torch.Tensor, k: torch.Tensor, indptr: torch.Tensor, offsets: torch.Tensor,
               rotary_dim: int | None = None, interleave: bool = False, rope_scale: float = 1, rope_theta: float = 1e4
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE over a ragged batch; returns ``(q_rope, k_rope)``.

    indptr: int ``[batch + 1]`` (request b owns tokens ``indptr[b]:indptr[b+1]``, ``indptr[-1] == nnz``);
    offsets: int ``[batch]``, the position of each request's first token. Other arguments as in
    `apply_rope_pos_ids`.
    """
    return _run(q, k, lambda: _indptr_positions(indptr, offsets, q.shape[0], q.device), rotary_dim, interleave,
                (_positive("rope_scale", rope_scale), _positive("rope_theta", rope_theta)), False)


def apply_rope_inplace(q: torch.Tensor, k: torch.Tensor, indptr: torch.Tensor, offsets: torch.Tensor,
                       rotary_dim: int | None = None, interleave: bool = False, rope_scale: float = 1,
                       rope_theta: float = 1e4) -> None:
    """In-place `apply_rope`."""
    _run(q, k, lambda: _indptr_positions(indptr, offsets, q.shape[0], q.device), rotary_dim, interleave,
         (_positive("rope_scale", rope_scale), _positive("rope_theta", rope_theta)), True)


def apply_llama31_rope_pos_ids(q: torch.Tensor, k: torch.Tensor, pos_ids: torch.Tensor, rotary_dim: int | None = None,
                               interleave: bool = False, rope_scale: float = 8, rope_theta: float = 5e5,
                               low_freq_factor: float = 1, high_freq_factor: float = 4, old_context_len: int = 8192
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 3.1 scaled RoPE at explicit positions; returns ``(q_rope, k_rope)``.

    rope_scale is the context-extension factor applied to long wavelengths, blended over the band
    between ``old_context_len / high_freq_factor`` and ``old_context_len / low_freq_factor``.
    """
    return _run(q, k, lambda: _check_pos_ids(pos_ids, q.shape[0], q.device), rotary_dim, interleave,
                _llama_args(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len), False)


def apply_llama31_rope_pos_ids_inplace(q: torch.Tensor, k: torch.Tensor, pos_ids: torch.Tensor,
                                       rotary_dim: int | None = None, interleave: bool = False, rope_scale: float = 8,
                                       rope_theta: float = 5e5, low_freq_factor: float = 1, high_freq_factor: float = 4,
                                       old_context_len: int = 8192) -> None:
    """In-place `apply_llama31_rope_pos_ids`."""
    _run(q, k, lambda: _check_pos_ids(pos_ids, q.shape[0], q.device), rotary_dim, interleave,
         _llama_args(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len), True)


def apply_llama31_rope(q: torch.Tensor, k: torch.Tensor, indptr: torch.Tensor, offsets: torch.Tensor,
                       rotary_dim: int | None = None, interleave: bool = False, rope_scale: float = 8,
                       rope_theta: float = 5e5, low_freq_factor: float = 1, high_freq_factor: float = 4,
                       old_context_len: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 3.1 scaled RoPE over a ragged batch (``indptr``/``offsets`` as in `apply_rope`)."""
    return _run(q, k, lambda: _indptr_positions(indptr, offsets, q.shape[0], q.device), rotary_dim, interleave,
                _llama_args(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len), False)


def apply_llama31_rope_inplace(q: torch.Tensor, k: torch.Tensor, indptr: torch.Tensor, offsets: torch.Tensor,
                               rotary_dim: int | None = None, interleave: bool = False, rope_scale: float = 8,
                               rope_theta: float = 5e5, low_freq_factor: float = 1, high_freq_factor: float = 4,
                               old_context_len: int = 8192) -> None:
    """In-place `apply_llama31_rope`."""
    _run(q, k, lambda: _indptr_positions(indptr, offsets, q.shape[0], q.device), rotary_dim, interleave,
         _llama_args(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len), True)


def rotate_llama(x: torch.Tensor, pos: torch.Tensor, rope_scale: float, rope_theta: float) -> torch.Tensor:
    """Non-interleaved full-head_dim RoPE of ``x [nnz, H, D]`` at ``pos [nnz]`` (a new tensor; for the
    wrappers' ``pos_encoding_mode="ROPE_LLAMA"``; arguments already validated)."""
    freqs = _ref.rope_frequencies(x.shape[-1], rope_scale, rope_theta, device=x.device)
    if not _paged.use_triton(x):
        return _ref.rope_ref(x, pos, freqs, False)
    from pagoda.kernels.rope import rope_fwd

    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    rope_fwd(x, out, pos, freqs.to(torch.float32), False)
    return out

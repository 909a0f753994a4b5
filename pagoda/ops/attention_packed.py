"""flash-attn 2's packed entry points: q, k, v (or k, v) stacked in one tensor.

Each unbinds its packed tensor into views (no copy; the kernels take strided q/k/v) and calls
`pagoda.flash_attn_func` / `pagoda.flash_attn_varlen_func`, so options, errors and returns are theirs.
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks
from pagoda.ops.attention import flash_attn_func, flash_attn_varlen_func

__all__ = ["flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func"]

_Out = torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]


def _unpack(name: str, t: torch.Tensor, ndim: int, n: int) -> tuple[torch.Tensor, ...]:
    """Views of the ``n`` tensors packed along dimension ``ndim - 3`` of ``t``."""
    _checks.check_tensor(name, t, ndim=ndim)
    if t.shape[ndim - 3] != n:
        raise ValueError(f"{name} must have {n} at dimension {ndim - 3} (the packed tensors), got shape "
                         f"{tuple(t.shape)}")
    return t.unbind(ndim - 3)


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                              return_attn_probs: bool = False) -> _Out:
    """``qkv [batch, seqlen, 3, nheads, headdim]`` -> as `pagoda.flash_attn_func` (q, k, v = qkv.unbind(2))."""
    q, k, v = _unpack("qkv", qkv, 5, 3)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False) -> _Out:
    """q ``[batch, seqlen_q, nheads, headdim]``, ``kv [batch, seqlen_k, 2, nheads_k, headdim]`` -> as
    `pagoda.flash_attn_func`."""
    k, v = _unpack("kv", kv, 5, 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: float | None = None,
                                     causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                                     deterministic: bool = False, return_attn_probs: bool = False) -> _Out:
    """``qkv [total, 3, nheads, headdim]`` ragged by int32 ``cu_seqlens [batch + 1]`` -> as
    `pagoda.flash_attn_varlen_func` with the same lengths for queries and keys."""
    q, k, v = _unpack("qkv", qkv, 4, 3)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: float | None = None,
                                    causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                                    deterministic: bool = False, return_attn_probs: bool = False) -> _Out:
    """q ``[total_q, nheads, headdim]``, ``kv [total_k, 2, nheads_k, headdim]`` -> as
    `pagoda.flash_attn_varlen_func`."""
    k, v = _unpack("kv", kv, 4, 2)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)

"""Cascade attention building blocks, FlashInfer-compatible: merging attention states by LSE.

LSEs are float32 natural logs, ``-inf`` for an empty segment (what pagoda's attention ops return).
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks
from pagoda.reference import cascade as _ref

__all__ = ["merge_state", "merge_state_in_place", "merge_states"]

_V_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_pair(v_name: str, v: torch.Tensor, s_name: str, s: torch.Tensor) -> None:
    _checks.check_tensor(v_name, v, ndim=3, dtypes=_V_DTYPES)
    _checks.check_tensor(s_name, s, ndim=2, dtypes=(torch.float32,))
    if tuple(s.shape) != tuple(v.shape[:2]):
        raise ValueError(f"{s_name} must have shape {tuple(v.shape[:2])} (seq_len, num_heads) to match "
                         f"{v_name}, got {tuple(s.shape)}")
    if s.device != v.device:
        raise ValueError(f"{s_name} must be on {v.device}, got {s.device}")


def _check_same(a_name, a, b_name, b):
    if a.shape != b.shape:
        raise ValueError(f"{b_name} must have the shape of {a_name} {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{b_name} must have the dtype of {a_name} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{b_name} must be on {a.device}, got {b.device}")


def _contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def merge_state(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor):
    """Merge the attention states of two KV segments A and B of the same queries.

    Args:
        v_a, v_b: ``[seq_len, num_heads, head_dim]`` fp16/bf16/fp32 attention outputs.
        s_a, s_b: ``[seq_len, num_heads]`` float32 natural-log LSEs (``-inf`` = empty segment).
    Returns:
        ``(V [seq_len, num_heads, head_dim], S [seq_len, num_heads] float32)``: attention over [A; B].
    """
    _check_pair("v_a", v_a, "s_a", s_a)
    _check_pair("v_b", v_b, "s_b", s_b)
    _check_same("v_a", v_a, "v_b", v_b)
    if not v_a.is_cuda:
        return _ref.merge_state(v_a, s_a, v_b, s_b)
    from pagoda.kernels.merge import merge_state_fwd

    v_a, v_b = _contig(v_a), _contig(v_b)
    out = torch.empty_like(v_a)
    lse = torch.empty_like(s_a)
    merge_state_fwd(v_a, s_a, v_b, s_b, out, lse)
    return out, lse


def merge_state_in_place(v: torch.Tensor, s: torch.Tensor, v_other: torch.Tensor, s_other: torch.Tensor,
                         mask: torch.Tensor | None = None) -> None:
    """Merge ``(v_other, s_other)`` into ``(v, s)`` in place.

    Args:
        v: ``[seq_len, num_heads, head_dim]`` (updated); s: ``[seq_len, num_heads]`` float32 (updated).
        v_other, s_other: the state to fold in, same shapes.
        mask: optional bool ``[seq_len]``: rows where it is False are left as they are (CUDA-graph
            friendly way to merge only some requests).
    """
    _check_pair("v", v, "s", s)
    _check_pair("v_other", v_other, "s_other", s_other)
    _check_same("v", v, "v_other", v_other)
    if mask is not None:
        _checks.check_tensor("mask", mask, ndim=1, dtypes=(torch.bool,))
        if mask.shape[0] != v.shape[0] or mask.device != v.device:
            raise ValueError(f"mask must be a bool [{v.shape[0]}] tensor on {v.device}, "
                             f"got {tuple(mask.shape)} on {mask.device}")
    if not v.is_cuda:
        _ref.merge_state_in_place(v, s, v_other, s_other, mask)
        return
    if v.stride(-1) != 1:
        raise ValueError("v must have a contiguous last dimension to be updated in place")
    from pagoda.kernels.merge import merge_state_fwd

    merge_state_fwd(v, s, _contig(v_other), s_other, v, s, mask)


def merge_states(v: torch.Tensor, s: torch.Tensor):
    """Merge ``num_states`` attention states per query.

    Args:
        v: ``[seq_len, num_states, num_heads, head_dim]``; s: ``[seq_len, num_states, num_heads]`` float32.
    Returns:
        ``(V [seq_len, num_heads, head_dim], S [seq_len, num_heads] float32)``.
    """
    _checks.check_tensor("v", v, ndim=4, dtypes=_V_DTYPES)
    _checks.check_tensor("s", s, ndim=3, dtypes=(torch.float32,))
    if tuple(s.shape) != tuple(v.shape[:3]):
        raise ValueError(f"s must have shape {tuple(v.shape[:3])} (seq_len, num_states, num_heads), "
                         f"got {tuple(s.shape)}")
    if s.device != v.device:
        raise ValueError(f"s must be on {v.device}, got {s.device}")
    if not v.is_cuda:
        return _ref.merge_states(v, s)
    from pagoda.kernels.merge import merge_states_fwd

    v = _contig(v)
    seq, _, heads, dim = v.shape
    out = torch.empty(seq, heads, dim, dtype=v.dtype, device=v.device)
    lse = torch.empty(seq, heads, dtype=torch.float32, device=v.device)
    merge_states_fwd(v, s, out, lse)
    return out, lse

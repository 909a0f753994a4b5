"""Rotary embedding from precomputed cos/sin tables: the entry points vLLM, SGLang and flash-attn users call.

* `apply_rope_with_cos_sin_cache` / `apply_rope_with_cos_sin_cache_inplace`: FlashInfer's (``flashinfer.rope``),
  the form vLLM's and SGLang's rotary layers call: ``query``/``key`` flattened ``[nnz, num_heads * head_size]``,
  ``cos_sin_cache [max_pos, rotary_dim]`` float32 with each row's cos first and sin second.
* `apply_rotary_emb`: flash-attn's (``flash_attn.layers.rotary``): ``x [batch, seqlen, heads, dim]`` (or varlen
  ``[total, heads, dim]`` with ``cu_seqlens``), tables ``cos, sin [seqlen_ro, rotary_dim / 2]``, positions shifted
  per sequence by ``seqlen_offsets``. Forward only (pagoda has no backward).

Semantics: `pagoda.reference.rope_table` (a position outside the table rotates by 0). On CUDA the Triton kernel in
`pagoda.kernels.rope_table` runs (no host read: capturable in a CUDA graph); elsewhere the reference.
"""
from __future__ import annotations

import operator

import torch

from pagoda.ops import _checks, _paged
from pagoda.reference import rope_table as _ref

__all__ = ["apply_rope_with_cos_sin_cache", "apply_rope_with_cos_sin_cache_inplace", "apply_rotary_emb"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INTS = (torch.int32, torch.int64)


def _rotate(x4: torch.Tensor, out4: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            interleave: bool) -> None:
    """Rotate ``x4 [outer, inner, H, D]`` into ``out4`` (may be x4) at ``pos [outer * inner]``."""
    if not _paged.use_triton(x4):
        flat = x4.reshape(-1, x4.shape[2], x4.shape[3])
        out4.copy_(_ref.rotate_with_table(flat, pos, cos, sin, interleave).view(x4.shape))
        return
    from pagoda.kernels.rope_table import rope_table_fwd

    rope_table_fwd(x4, out4, pos.contiguous(), cos, sin, interleave)


def _heads_view(name: str, t: torch.Tensor, head_size: int, inplace: bool) -> torch.Tensor:
    """``t [nnz, H * head_size]`` (or already ``[nnz, H, head_size]``) as ``[nnz, H, head_size]``."""
    _checks.check_tensor(name, t, dtypes=_FLOATS)
    if t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[2] != head_size):
        raise ValueError(f"{name} must be [nnz, num_heads * head_size] (or [nnz, num_heads, head_size]), "
                         f"got {tuple(t.shape)} with head_size={head_size}")
    width = t.shape[1] * (t.shape[2] if t.dim() == 3 else 1)
    if width % head_size:
        raise ValueError(f"head_size ({head_size}) must divide {name}'s last dimension ({width})")
    try:
        view = t.view(t.shape[0], width // head_size, head_size)
    except RuntimeError:
        if inplace:
            raise ValueError(f"{name} must be viewable as [nnz, num_heads, head_size] to be rotated in place "
                             f"(got strides {t.stride()})") from None
        view = t.reshape(t.shape[0], width // head_size, head_size)
    if inplace and view.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension to be rotated in place")
    return view


def _cache_tables(positions, query, key, head_size, cos_sin_cache, is_neox, inplace):
    _checks.check_tensor("cos_sin_cache", cos_sin_cache, ndim=2)
    if cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache should be float32, got {cos_sin_cache.dtype}")
    head_size = _checks.check_int("head_size", head_size, 1)
    if not isinstance(is_neox, bool):
        raise TypeError(f"is_neox must be a bool, got {type(is_neox).__name__}")
    rd = cos_sin_cache.shape[1]
    if rd < 2 or rd % 2 or rd > head_size:
        raise ValueError(f"cos_sin_cache must be [max_pos, rotary_dim] with rotary_dim even in 2..head_size "
                         f"({head_size}), got {tuple(cos_sin_cache.shape)}")
    q3 = _heads_view("query", query, head_size, inplace)
    k3 = _heads_view("key", key, head_size, inplace)
    _checks.check_same("query, key", (query, key), "dtype")
    _checks.check_same("query, key, cos_sin_cache", (query, key, cos_sin_cache), "device")
    _checks.check_tensor("positions", positions, ndim=1, dtypes=_INTS)
    if positions.shape[0] != q3.shape[0] or k3.shape[0] != q3.shape[0]:
        raise ValueError(f"positions, query and key must have the same number of tokens, got {positions.shape[0]}, "
                         f"{q3.shape[0]} and {k3.shape[0]}")
    if positions.device != query.device:
        raise ValueError(f"positions must be on {query.device}, got {positions.device}")
    table = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    return q3, k3, table[:, :rd // 2], table[:, rd // 2:]


def apply_rope_with_cos_sin_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
                                  cos_sin_cache: torch.Tensor, is_neox: bool = True
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE with a precomputed cos/sin cache (FlashInfer's signature, as vLLM and SGLang call it).

    Args:
        positions: int32/int64 ``[nnz]`` position of each token (a row of ``cos_sin_cache``).
        query: ``[nnz, num_q_heads * head_size]``; key: ``[nnz, num_k_heads * head_size]``; fp16/bf16/fp32, one dtype.
        head_size: per-head dimension (divides the last dimension of query and key).
        cos_sin_cache: float32 ``[max_pos, rotary_dim]``: ``cos`` in ``[:, :rotary_dim/2]``, ``sin`` in the rest;
            the first ``rotary_dim`` dims of each head are rotated, the others pass through.
        is_neox: pairs ``(i, i + rotary_dim/2)`` (True) or ``(2i, 2i+1)`` (False, interleaved).
    Returns:
        ``(query_out, key_out)``: new tensors of query's and key's shapes.
    """
    q3, k3, cos, sin = _cache_tables(positions, query, key, head_size, cos_sin_cache, is_neox, False)
    q_out = torch.empty_like(query, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(key, memory_format=torch.contiguous_format)
    for x, out in ((q3, q_out), (k3, k_out)):
        x = x if x.stride(-1) == 1 else x.contiguous()
        _rotate(x[None], out.view(x.shape)[None], positions, cos, sin, not is_neox)
    return q_out, k_out


def apply_rope_with_cos_sin_cache_inplace(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                          head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
    """`apply_rope_with_cos_sin_cache` writing into ``query`` and ``key`` (returns None)."""
    q3, k3, cos, sin = _cache_tables(positions, query, key, head_size, cos_sin_cache, is_neox, True)
    for x in (q3, k3):
        _rotate(x[None], x[None], positions, cos, sin, not is_neox)


def _rotary_positions(x, seqlen_offsets, cu_seqlens, max_seqlen, seqlen_ro: int) -> tuple[torch.Tensor, int]:
    """``(pos [tokens], batch)``: each token's table row (``-1``, i.e. no rotation, past ``cu_seqlens[-1]``)."""
    dev = x.device
    if cu_seqlens is None:
        batch, seqlen = x.shape[0], x.shape[1]
    else:
        _checks.check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=_INTS)
        if cu_seqlens.shape[0] < 1 or cu_seqlens.device != dev:
            raise ValueError(f"cu_seqlens must be an int [batch + 1] tensor on {dev}")
        if max_seqlen is None:
            raise ValueError("max_seqlen is required with cu_seqlens (flash-attn's contract)")
        batch, seqlen = cu_seqlens.shape[0] - 1, _checks.check_int("max_seqlen", max_seqlen, 0)
    if seqlen_ro < seqlen:
        raise ValueError(f"cos/sin have {seqlen_ro} rows (seqlen_ro) but the sequences have up to {seqlen}: "
                         "seqlen_ro must be >= seqlen")
    if isinstance(seqlen_offsets, torch.Tensor):
        _checks.check_tensor("seqlen_offsets", seqlen_offsets, ndim=1, dtypes=_INTS)
        if seqlen_offsets.shape[0] != batch or seqlen_offsets.device != dev:
            raise ValueError(f"seqlen_offsets must be an int32/int64 tensor of shape ({batch},) on {dev}, got "
                             f"{tuple(seqlen_offsets.shape)} on {seqlen_offsets.device}")
        offsets = seqlen_offsets.to(torch.int64)
    else:
        try:
            off = operator.index(seqlen_offsets)
        except TypeError:
            raise TypeError(f"seqlen_offsets must be an int or an int tensor of shape ({batch},), got "
                            f"{type(seqlen_offsets).__name__}") from None
        if off < 0 or off + seqlen > seqlen_ro:
            raise ValueError(f"seqlen_offsets ({off}) + seqlen ({seqlen}) must lie within the {seqlen_ro} rows of "
                             "cos/sin")
        offsets = torch.full((batch,), off, dtype=torch.int64, device=dev)
    if cu_seqlens is None:
        pos = torch.arange(seqlen, device=dev)[None, :] + offsets[:, None]
        return pos.reshape(-1), batch
    total = x.shape[0]
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(total, device=dev)
    if batch == 0:
        return torch.full((total,), -1, dtype=torch.int64, device=dev), batch
    b = torch.searchsorted(cu[1:], t, right=True).clamp(max=batch - 1)
    pos = t - cu[b] + offsets[b]
    return torch.where(t < cu[-1], pos, -1), batch


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                     inplace: bool = False, seqlen_offsets: int | torch.Tensor = 0,
                     cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    """flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb`` (forward).

    Args:
        x: ``[batch, seqlen, nheads, headdim]``, or ``[total_seqlen, nheads, headdim]`` with ``cu_seqlens``;
            fp16/bf16/fp32.
        cos, sin: ``[seqlen_ro, rotary_dim / 2]`` (any float dtype; math in float32); the first ``rotary_dim``
            dims of each head are rotated, the rest pass through.
        interleaved: GPT-J pairs ``(2i, 2i+1)`` instead of the halves (GPT-NeoX).
        inplace: rotate ``x`` itself (returned).
        seqlen_offsets: int, or int32/int64 ``[batch]``: token ``t`` of sequence ``b`` uses table row
            ``t + seqlen_offsets[b]`` (a KV cache's current length).
        cu_seqlens: int32 ``[batch + 1]`` for the varlen form; max_seqlen: its longest sequence (required with it).
    Returns:
        ``[batch, seqlen, nheads, headdim]`` (or ``[total_seqlen, nheads, headdim]``), x's dtype.
    Raises ValueError where flash-attn asserts (rotary_dim > headdim, seqlen_ro < seqlen, offsets past the table).
    """
    _checks.check_tensor("x", x, ndim=3 if cu_seqlens is not None else 4, dtypes=_FLOATS)
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.check_tensor(name, t, ndim=2)
        if not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"{name} must be a floating tensor on {x.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if 2 * cos.shape[1] > x.shape[-1] or cos.shape[1] == 0:
        raise ValueError(f"rotary_dim (2 * cos.shape[1] = {2 * cos.shape[1]}) must be in 2..headdim ({x.shape[-1]})")
    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if inplace and x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension to be rotated in place")
    pos, _ = _rotary_positions(x, seqlen_offsets, cu_seqlens, max_seqlen, cos.shape[0])
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    src = x if x.stride(-1) == 1 else x.contiguous()
    out = x if inplace else torch.empty_like(src)
    x4, out4 = (src, out) if cu_seqlens is None else (src[None], out[None])
    _rotate(x4, out4, pos, cos, sin, interleaved)
    return out

"""flash-attn 2 compatible attention entry points (drop-in: change the import).

On CUDA tensors these run pagoda's Triton kernels; on any other device they run the PyTorch
reference in `pagoda.reference.attention` (same semantics, float32 arithmetic).
"""
from __future__ import annotations

import torch

from pagoda.ops import _attention_paged, _checks, _paged
from pagoda.ops._attention_op import attention_fwd_op
from pagoda.reference import attention as _ref

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()



def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention over a dense batch, flash-attn 2's ``flash_attn_func``.

    Args:
        q: ``[batch, seqlen_q, nheads, headdim]`` fp16/bf16 (fp32 too on the CPU path).
        k, v: ``[batch, seqlen_k, nheads_k, headdim]``; ``nheads`` a multiple of ``nheads_k`` (GQA/MQA).
        dropout_p: must be 0.0 (inference only); > 0 raises NotImplementedError.
        softmax_scale: defaults to ``headdim ** -0.5``.
        causal: mask aligned to the bottom-right corner when seqlen_q != seqlen_k.
        window_size: ``(left, right)`` sliding window, -1 = unbounded; a tuple, list or tensor of two ints. As
            in flash-attn, ``causal=True`` sets ``right`` to 0 and a bound ``>= seqlen_k`` means unbounded.
        softcap: > 0 applies ``softcap * tanh(scores / softcap)``.
        alibi_slopes: float32 ``[nheads]`` or ``[batch, nheads]``; adds ``-slope * |i + sk - sq - j|``.
        deterministic: accepted for compatibility (the forward pass is always deterministic).
        return_attn_probs: also return the log-sum-exp.

    Returns:
        ``out [batch, seqlen_q, nheads, headdim]`` (q.dtype); with ``return_attn_probs`` the tuple
        ``(out, softmax_lse [batch, nheads, seqlen_q] float32 natural log, None)`` — the attention
        probabilities are never materialised. Rows that see no key get zeros and LSE ``-inf``.

    Example:
        >>> q = torch.randn(2, 1024, 32, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)   # GQA 32/8
        >>> pagoda.flash_attn_func(q, k, v, causal=True).shape
        torch.Size([2, 1024, 32, 128])
    """
    if _checks.plain_dense_call(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes):
        b, sq, hq, d = q.shape  # every check below would pass (a short call's host time is what it costs)
        left, right = -1, (0 if causal else -1)
    else:
        for name, t in (("q", q), ("k", k), ("v", v)):
            _checks.check_tensor(name, t, ndim=4)
        _checks.check_attention_dtypes(q, k, v)
        _checks.check_head_dims(q, k, v)
        b, sq, hq, d = q.shape
        if k.shape[0] != b or v.shape[0] != b:
            raise ValueError(f"q, k, v must share batch size, got {b}, {k.shape[0]}, {v.shape[0]}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"k and v must have the same seqlen_k, got {k.shape[1]} and {v.shape[1]}")
        left, right = _checks.check_options(dropout_p, softmax_scale, causal, window_size, softcap, k.shape[1])
        alibi_slopes = _checks.check_alibi(alibi_slopes, b, hq, q.device)
    scale = float(softmax_scale) if softmax_scale is not None else d ** -0.5

    if not q.is_cuda:
        return _ref.flash_attn_func(q, k, v, 0.0, scale, causal, (left, right), float(softcap), alibi_slopes,
                                    deterministic, return_attn_probs)

    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device) if return_attn_probs else None
    if b > 0 and sq > 0:
        attention_fwd_op(q, k, v, out, lse, None, None, alibi_slopes, sq, b, scale, left, right, float(softcap))
    if return_attn_probs:
        return out, lse, None
    return out


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: torch.Tensor | None = None
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention over a ragged batch, flash-attn 2's ``flash_attn_varlen_func``.

    Args:
        q: ``[total_q, nheads, headdim]``; k, v: ``[total_k, nheads_k, headdim]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]`` prefix sums of the sequence lengths
            (0, non-decreasing, last entry <= total tokens). Sequences may be empty.
        max_seqlen_q, max_seqlen_k: ints, at least the longest query / key sequence.
        Other options as in `flash_attn_func`; alibi_slopes ``[nheads]`` or ``[batch, nheads]``.
        block_table: int32 ``[batch, max_blocks]``: k, v are then a paged cache ``[num_blocks, page_block_size,
            nheads_k, headdim]`` (any page size), sequence ``b`` reading the pages ``block_table[b]`` and
            ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` keys (`pagoda.ops._attention_paged`).

    Returns:
        ``out [total_q, nheads, headdim]``; with ``return_attn_probs`` the tuple
        ``(out, softmax_lse [nheads, total_q] float32, None)``. Tokens past ``cu_seqlens_q[-1]`` get zeros.

    Example:
        >>> cu = torch.tensor([0, 100, 1100], dtype=torch.int32, device="cuda")        # two sequences
        >>> q = k = v = torch.randn(1100, 8, 64, device="cuda", dtype=torch.float16)
        >>> pagoda.flash_attn_varlen_func(q, k, v, cu, cu, 1000, 1000, causal=True).shape
        torch.Size([1100, 8, 64])
    """
    paged = block_table is not None
    _checks.check_tensor("q", q, ndim=3)
    for name, t in (("k", k), ("v", v)):
        _checks.check_tensor(name, t, ndim=4 if paged else 3)
    _checks.check_attention_dtypes(q, k, v)
    _checks.check_head_dims(q, k, v)
    if not paged and v.shape[0] != k.shape[0]:
        raise ValueError(f"k and v must have the same number of tokens, got {k.shape[0]} and {v.shape[0]}")
    max_seqlen_q = _checks.check_int("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _checks.check_int("max_seqlen_k", max_seqlen_k)
    _checks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, None, q.shape[0], q.device, max_seqlen_q,
                             "max_seqlen_q")
    batch = cu_seqlens_q.shape[0] - 1
    if paged:
        page_size = _attention_paged.check_paged_kv(k, v, block_table, batch, q.device)
        total_k = batch * block_table.shape[1] * page_size   # each sequence within its own row of pages
        _checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, batch, total_k, q.device, max_seqlen_k,
                                 "max_seqlen_k")
        if batch and not _paged.capturing(cu_seqlens_k):
            longest = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
            if longest > block_table.shape[1] * page_size:
                raise ValueError(f"a sequence of cu_seqlens_k has {longest} keys, more than block_table's "
                                 f"{block_table.shape[1]} pages of {page_size} hold")
    else:
        _checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, batch, k.shape[0], q.device, max_seqlen_k,
                                 "max_seqlen_k")
    left, right = _checks.check_options(dropout_p, softmax_scale, causal, window_size, softcap, max_seqlen_k)
    hq = q.shape[1]
    alibi_slopes = _checks.check_alibi(alibi_slopes, batch, hq, q.device)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    if paged:
        out, lse = _attention_paged.paged_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table,
                                                 scale, (left, right), float(softcap), alibi_slopes)
        return (out, lse, None) if return_attn_probs else out

    if not q.is_cuda:
        return _ref.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           0.0, scale, causal, (left, right), float(softcap), alibi_slopes,
                                           deterministic, return_attn_probs)

    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    # Zero-filled so tokens past cu_seqlens_q[-1] (padding a caller left) hold zeros, not garbage.
    out = torch.zeros_like(q)
    lse = (torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
           if return_attn_probs else None)
    if batch > 0 and max_seqlen_q > 0:
        attention_fwd_op(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, batch, scale,
                         left, right, float(softcap))
    if return_attn_probs:
        return out, lse, None
    return out

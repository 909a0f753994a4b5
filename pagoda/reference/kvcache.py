"""Plain-PyTorch `flash_attn_with_kvcache` (flash-attn 2's inference entry point).

Steps, per flash-attn 2's contract:

1. With new ``k``/``v`` ``[b, s_new, hk, d]``: rotate ``k`` (when rotary tables are given) at positions
   ``cache_seqlens[b] + i`` and write k/v into the cache at those positions (in place). The cache is
   contiguous per sequence (``[b_cache, s_cache, hk, d]``, row ``cache_batch_idx[b]``) or paged
   (``[num_blocks, page_size, hk, d]`` through ``block_table [b, max_blocks]``).
2. Rotate q: at ``cache_seqlens + i`` when causal or local, else every query at ``cache_seqlens``.
3. Attend q to the first ``cache_seqlens[b] + s_new`` keys of each sequence (bottom-right aligned
   causal/window masks, softcap, ALiBi), as `pagoda.reference.attention.attention_ref`. With
   ``cache_leftpad`` the keys before ``cache_leftpad[b]`` are dropped first, so the masks and ALiBi count
   from there; the append and the rotary positions (steps 1-2) stay absolute cache positions.

The append and rotation helpers here are vectorised torch ops (no host sync) shared by the ops layer.
"""
from __future__ import annotations

import torch

from pagoda.reference.attention import attention_ref

__all__ = ["rotate_with_tables", "append_new_kv", "flash_attn_with_kvcache"]


def rotate_with_tables(x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       interleaved: bool) -> torch.Tensor:
    """Rotate the first ``rotary_dim = 2 * cos.shape[1]`` dims of ``x [b, s, h, d]`` with table rows
    ``cos[pos]``, ``sin[pos]`` (``pos`` int ``[b, s]``); float32 math, returns x's dtype."""
    half = cos.shape[1]
    rd = 2 * half
    c = cos[pos.long()].float()[:, :, None, :]          # [b, s, 1, half]
    s = sin[pos.long()].float()[:, :, None, :]
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0:rd:2], xf[..., 1:rd:2]
    else:
        x1, x2 = xf[..., :half], xf[..., half:rd]
    r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = xf.clone()
    if interleaved:
        out[..., 0:rd:2], out[..., 1:rd:2] = r1, r2
    else:
        out[..., :half], out[..., half:rd] = r1, r2
    return out.to(x.dtype)


def append_new_kv(k_cache, v_cache, k, v, seqlens: torch.Tensor, cache_batch_idx, block_table) -> None:
    """Write ``k``/``v [b, s_new, hk, d]`` at positions ``seqlens[b] + i`` of each sequence (in place)."""
    b, s_new = k.shape[:2]
    pos = seqlens.long()[:, None] + torch.arange(s_new, device=k.device)[None, :]          # [b, s_new]
    if block_table is None:
        rows = (torch.arange(b, device=k.device) if cache_batch_idx is None else cache_batch_idx.long())
        rows = rows[:, None].expand(b, s_new)
        k_cache[rows, pos] = k.to(k_cache.dtype)
        v_cache[rows, pos] = v.to(v_cache.dtype)
    else:
        page_size = k_cache.shape[1]
        page = torch.gather(block_table.long(), 1, pos // page_size)
        k_cache[page, pos % page_size] = k.to(k_cache.dtype)
        v_cache[page, pos % page_size] = v.to(v_cache.dtype)


def _query_positions(seqlens, sq, causal_or_local):
    base = seqlens.long()[:, None]
    if causal_or_local:
        return base + torch.arange(sq, device=seqlens.device)[None, :]
    return base.expand(-1, sq)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            compute_dtype=torch.float32):
    """Reference for `pagoda.flash_attn_with_kvcache`; ``cache_seqlens`` must be an int32 tensor ``[b]`` here,
    ``cache_leftpad`` None or int32 ``[b]``.

    Returns ``out [b, sq, hq, d]``, or ``(out, lse [b, hq, sq] float32)`` with return_softmax_lse.
    """
    b, sq, hq, d = q.shape
    s_new = 0 if k is None else k.shape[1]
    if k is not None:
        if rotary_cos is not None:
            kpos = cache_seqlens.long()[:, None] + torch.arange(s_new, device=q.device)[None, :]
            k = rotate_with_tables(k, kpos, rotary_cos, rotary_sin, rotary_interleaved)
        append_new_kv(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
    if rotary_cos is not None:
        local = causal or tuple(window_size) != (-1, -1)
        q = rotate_with_tables(q, _query_positions(cache_seqlens, sq, local), rotary_cos, rotary_sin,
                               rotary_interleaved)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    left, right = int(window_size[0]), (0 if causal else int(window_size[1]))
    kv_lens = (cache_seqlens.long() + s_new).tolist()
    starts = [0] * b if cache_leftpad is None else cache_leftpad.tolist()
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    for i, n in enumerate(kv_lens):
        if block_table is None:
            row = i if cache_batch_idx is None else int(cache_batch_idx[i])
            kk, vv = k_cache[row, starts[i]:n], v_cache[row, starts[i]:n]
        else:
            ps = k_cache.shape[1]
            pages = block_table[i, : -(-n // ps)].long()
            kk = k_cache[pages].reshape(-1, *k_cache.shape[2:])[starts[i]:n]
            vv = v_cache[pages].reshape(-1, *v_cache.shape[2:])[starts[i]:n]
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[i])
        o, row_lse = attention_ref(q[i], kk, vv, softmax_scale=scale, window_left=left, window_right=right,
                                   softcap=softcap, alibi_slopes=slopes, compute_dtype=compute_dtype)
        out[i], lse[i] = o, row_lse
    return (out, lse) if return_softmax_lse else out

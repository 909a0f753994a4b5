"""`flash_attn_with_kvcache`, flash-attn 2's inference entry point (drop-in: same signature).

Appends the new k/v into the cache in place (rotating k first when rotary tables are given), then
attends. The cache is contiguous per sequence or paged through ``block_table`` with any page size
(flash-attn needs multiples of 256). On CUDA: one query token per sequence runs the split-KV decode
kernel, longer queries the paged prefill kernel; a contiguous cache is handed to them as one page per
sequence, a block table as equal-width page rows, so no page table is built and nothing syncs except
the argument checks (skipped while a CUDA graph is being captured). A ``cache_leftpad`` start is folded into
the page description (`_leftpad_view`): each sequence's one page begins at its first attended token, still
without a copy of the cache. Semantics: `pagoda.reference.kvcache`.
"""
from __future__ import annotations

import operator

import torch

from pagoda.ops import _checks, _paged
from pagoda.ops import _decode_plan as _plan
from pagoda.reference import kvcache as _ref

__all__ = ["flash_attn_with_kvcache"]


def _check_int_vec(name, t, b, device):
    _checks.check_tensor(name, t, ndim=1, dtypes=(torch.int32,))
    if t.shape[0] != b or t.device != device:
        raise ValueError(f"{name} must be an int32 [{b}] tensor on {device}, got {tuple(t.shape)} on {t.device}")


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                            cache_seqlens: torch.Tensor | None = None, cache_batch_idx: torch.Tensor | None = None,
                            cache_leftpad: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: torch.Tensor | None = None,
                            num_splits: int = 0, return_softmax_lse: bool = False
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [b, seqlen_q, nheads, headdim]`` to a KV cache, appending new keys/values first.

    Args:
        k_cache, v_cache: ``[b_cache, seqlen_cache, nheads_k, headdim]`` (contiguous per sequence), or
            ``[num_blocks, page_size, nheads_k, headdim]`` with ``block_table``; q's dtype.
        k, v: optional ``[b, seqlen_new, nheads_k, headdim]``, written at positions ``cache_seqlens + i``.
        rotary_cos, rotary_sin: optional ``[seqlen_ro, rotary_dim / 2]`` tables (need k/v); k rotates at
            ``cache_seqlens + i``; q too when causal or local, else all of q at ``cache_seqlens``.
        cache_seqlens: int or int32 ``[b]``, keys already in each sequence (None: the full cache).
        cache_batch_idx: int32 ``[b]`` cache row of each sequence (contiguous cache only).
        cache_leftpad: int32 ``[b]``, the cache position where each sequence starts (None: 0). Keys before it
            are not attended; positions stay absolute (new k/v at ``cache_seqlens + i``, rotary tables read
            there), while causal/window/ALiBi count from the start. Contiguous cache only (as flash-attn).
        block_table: int32 ``[b, max_blocks]`` page ids of each sequence; any page_size >= 1.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as in `pagoda.flash_attn_func`.
        rotary_interleaved: GPT-J pairs ``(2i, 2i+1)`` (default) or halves.
        num_splits: 0 = heuristic, 1 = no split, n > 1 = split the keys in n (single-token queries).
        return_softmax_lse: also return ``lse [b, nheads, seqlen_q]`` float32 (``-inf`` where no key).

    Returns ``out [b, seqlen_q, nheads, headdim]`` or ``(out, lse)``.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.check_tensor(name, t, ndim=4, dtypes=_paged.CACHE_DTYPES)
    _checks.check_same("q, k_cache, v_cache", (q, k_cache, v_cache), "dtype")
    _checks.check_same("q, k_cache, v_cache", (q, k_cache, v_cache), "device")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in their last dimension")
    b, sq, hq, d = q.shape
    hk = k_cache.shape[2]
    _plan.check_heads(hq, hk, d)
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache head_dim ({k_cache.shape[3]}) must equal q's ({d})")
    dev = q.device
    left, right = _checks.check_options(0.0, softmax_scale, causal, window_size, softcap)
    alibi_slopes = _checks.check_alibi(alibi_slopes, b, hq, dev)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(rotary_interleaved).__name__}")
    if block_table is not None:
        _checks.check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
        if block_table.shape[0] != b or block_table.device != dev or block_table.shape[1] < 1:
            raise ValueError(f"block_table must be an int32 [{b}, max_blocks >= 1] tensor on {dev}, got "
                             f"{tuple(block_table.shape)} on {block_table.device}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (the table already maps rows)")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            _check_int_vec("cache_batch_idx", cache_batch_idx, b, dev)
        elif k_cache.shape[0] < b:
            raise ValueError(f"k_cache has {k_cache.shape[0]} rows for a batch of {b} (pass cache_batch_idx)")
    if cache_leftpad is not None:
        if block_table is not None:
            # flash-attn 2.8.3 refuses this pair too (paged KV and leftpad_k not supported together).
            raise ValueError("cache_leftpad cannot be combined with block_table (paged KV), as in flash-attn")
        _check_int_vec("cache_leftpad", cache_leftpad, b, dev)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    s_new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _checks.check_tensor(name, t, ndim=4, dtypes=(q.dtype,))
            if t.shape[0] != b or tuple(t.shape[2:]) != (hk, d) or t.device != dev:
                raise ValueError(f"{name} must be [{b}, seqlen_new, {hk}, {d}] on {dev}, got {tuple(t.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        s_new = k.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when appending k/v (where would they go?)")
        seqlens = torch.full((b,), capacity, dtype=torch.int32, device=dev)
    elif isinstance(cache_seqlens, torch.Tensor):
        _check_int_vec("cache_seqlens", cache_seqlens, b, dev)
        seqlens = cache_seqlens
    else:
        if isinstance(cache_seqlens, bool):
            raise TypeError("cache_seqlens must be an int or an int32 tensor, got bool")
        try:
            n = operator.index(cache_seqlens)
        except TypeError:
            raise TypeError("cache_seqlens must be an int or an int32 tensor, got "
                            f"{type(cache_seqlens).__name__}") from None
        if not 0 <= n <= capacity:
            raise ValueError(f"cache_seqlens = {n} must be in 0..{capacity} (the cache's capacity)")
        seqlens = torch.full((b,), n, dtype=torch.int32, device=dev)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need the new k/v to append (flash-attn's contract)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _checks.check_tensor(name, t, ndim=2, dtypes=_paged.CACHE_DTYPES)
            if t.shape != rotary_cos.shape or t.device != dev or not 1 <= 2 * t.shape[1] <= d:
                raise ValueError(f"{name} must be [seqlen_ro, rotary_dim / 2] with rotary_dim <= headdim ({d}) "
                                 f"on {dev}, got {tuple(t.shape)}")
    if not _paged.capturing(q):
        lens = seqlens.long()
        if lens.numel() and (bool((lens < 0).any()) or int(lens.max()) + s_new > capacity):
            raise ValueError(f"cache_seqlens + seqlen_new must stay within 0..{capacity} (the cache's capacity)")
        if block_table is not None and block_table.numel():
            lo, hi = int(block_table.min()), int(block_table.max())
            if lo < 0 or hi >= k_cache.shape[0]:
                raise ValueError(f"block_table ids must be in [0, {k_cache.shape[0]}), got [{lo}, {hi}]")
        if cache_batch_idx is not None and b:
            lo, hi = int(cache_batch_idx.min()), int(cache_batch_idx.max())
            if lo < 0 or hi >= k_cache.shape[0]:
                raise ValueError(f"cache_batch_idx must be in [0, {k_cache.shape[0]}), got [{lo}, {hi}]")
            if k is not None and s_new and torch.unique(cache_batch_idx).numel() != b:
                # Two sequences appending into one cache row would race (and overwrite each other).
                raise ValueError("cache_batch_idx must not repeat a cache row when appending k/v")
        if cache_leftpad is not None and b and bool(((cache_leftpad < 0) | (cache_leftpad.long() > lens)).any()):
            raise ValueError("cache_leftpad must be in 0..cache_seqlens[i] for every sequence i (it is where the "
                             f"cache starts), got {cache_leftpad.tolist()} with cache_seqlens {lens.tolist()}")
        if rotary_cos is not None and b and int(lens.max()) + max(s_new, sq) > rotary_cos.shape[0]:
            raise ValueError(f"rotary tables have {rotary_cos.shape[0]} rows, fewer than the positions used")

    if not _paged.use_triton(q):
        return _ref.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens,
                                            cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                                            (left, right),
                                            softcap, rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse)
    return _kernel_path(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx, cache_leftpad,
                        block_table, softmax_scale, causal, (left, right), float(softcap), rotary_interleaved,
                        alibi_slopes, num_splits, return_softmax_lse, capacity)


def _leftpad_view(k_cache, v_cache, rows, leftpad, capacity):
    """Dense caches ``[b_cache, s_cache, hk, d]`` seen as one page per sequence that starts at its
    ``leftpad``: ``(k_view, v_view, indices)`` with views ``[n, capacity, hk, d]`` whose page stride is one
    token, so page ``rows * (s0 / s1) + leftpad`` begins at token ``leftpad`` of cache row ``rows`` (pages
    overlap; the kernels only read them). The views' extent is the caches' own, so the Hopper kernel's TMA
    bounds hold. Caches whose row stride is not a whole number of tokens (or differs between k and v in
    tokens) are copied contiguous first: the read happens after the append, so the copy is up to date."""
    if not all(c.stride(1) > 0 and c.stride(0) % c.stride(1) == 0 for c in (k_cache, v_cache)) or (
            k_cache.stride(0) // k_cache.stride(1) != v_cache.stride(0) // v_cache.stride(1)):
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    per_row = k_cache.stride(0) // k_cache.stride(1)
    n = (k_cache.shape[0] - 1) * per_row + 1
    views = [c.as_strided((n, capacity, c.shape[2], c.shape[3]), (c.stride(1), c.stride(1), c.stride(2), 1))
             for c in (k_cache, v_cache)]
    indices = (rows.long() * per_row + leftpad.long()).to(torch.int32)
    return views[0], views[1], indices


def _kernel_path(q, k_cache, v_cache, k, v, cos, sin, seqlens, batch_idx, leftpad, block_table, softmax_scale,
                 causal, window, softcap, interleaved, alibi_slopes, num_splits, return_lse, capacity):
    from pagoda.kernels.attention.decode import decode_fwd
    from pagoda.ops._dispatch import prefill_paged

    b, sq, hq, d = q.shape
    hk, dev = k_cache.shape[2], q.device
    s_new = 0 if k is None else k.shape[1]
    if k is not None:
        if cos is not None:
            kpos = seqlens.long()[:, None] + torch.arange(s_new, device=dev)[None, :]
            k = _ref.rotate_with_tables(k, kpos, cos, sin, interleaved)
        _ref.append_new_kv(k_cache, v_cache, k, v, seqlens, batch_idx, block_table)
    if cos is not None:
        local = causal or window != (-1, -1)
        qpos = seqlens.long()[:, None] + (torch.arange(sq, device=dev)[None, :] if local else 0)
        q = _ref.rotate_with_tables(q, qpos.expand(b, sq), cos, sin, interleaved)
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv_len = seqlens + s_new
    # Describe the cache to the paged kernels: KV length = (pages - 1) * page_size + last.
    if block_table is None:
        page_size = k_cache.shape[1]
        indices = batch_idx if batch_idx is not None else torch.arange(b, dtype=torch.int32, device=dev)
        indptr = torch.arange(b + 1, dtype=torch.int32, device=dev)
        if leftpad is not None:
            # Keys before leftpad are outside the page: lengths and masks count from the start.
            k_cache, v_cache, indices = _leftpad_view(k_cache, v_cache, indices, leftpad, capacity)
            kv_len = kv_len - leftpad
        last = kv_len.to(torch.int32)
    else:
        page_size, width = k_cache.shape[1], block_table.shape[1]
        indices = block_table.contiguous().view(-1)
        indptr = torch.arange(b + 1, dtype=torch.int32, device=dev) * width
        last = (kv_len - (width - 1) * page_size).to(torch.int32)
    strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    v_strides = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    left, right = window
    if sq == 1:
        # The single query sits at the last key: right windows are moot, split-KV over the longest possible.
        if num_splits == 1:
            chunk, splits = 0, 0
        elif num_splits > 1:
            chunk = -(-capacity // num_splits)
            splits = -(-capacity // chunk)
        else:
            chunk, splits = _plan.choose_chunk(capacity, b, hk, _plan.num_sms(dev), 1, None, False, _plan.MAX_SPLITS)
        splits = min(splits, _plan.MAX_SPLITS) if splits > 1 else 0
        if splits:
            chunk = -(-capacity // splits)
        chunk_buf = torch.full((1,), max(chunk, 1), dtype=torch.int32, device=dev)
        ws = torch.empty(max(splits, 1) * b * hq * (d + 1), dtype=torch.float32, device=dev)
        o_part, lse_part = _plan.workspace_views(ws, b, splits, hq, d)
        out = torch.empty(b, hq, d, dtype=q.dtype, device=dev)
        lse = torch.empty(b, hq, dtype=torch.float32, device=dev)
        decode_fwd(q[:, 0], k_cache, v_cache, strides, v_strides, indptr, indices, last, page_size, hk, out, lse,
                   chunk=chunk_buf, num_splits=splits, o_part=o_part, lse_part=lse_part, sm_scale=scale,
                   window_left=left, logits_soft_cap=softcap, alibi_slopes=alibi_slopes)
        out, lse = out[:, None], lse[:, :, None]
    else:
        qf = q.reshape(b * sq, hq, d)
        out = torch.empty_like(qf)
        lse = torch.empty(b * sq, hq, dtype=torch.float32, device=dev)
        qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=dev) * sq
        prefill_paged(qf, k_cache, v_cache, strides, v_strides, qo_indptr, indptr, indices, last, page_size, hk,
                      sq, out, lse, sm_scale=scale, causal=causal, window_left=left, window_right=right,
                      logits_soft_cap=softcap, alibi_slopes=alibi_slopes)
        out = out.view(b, sq, hq, d)
        lse = lse.view(b, sq, hq).transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out

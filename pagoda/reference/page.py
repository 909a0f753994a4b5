"""Plain-PyTorch paged KV cache: CSR metadata helpers and append (the CPU path and the test oracle).

Layout (FlashInfer's): request ``b`` owns the pages ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` in
order; all its pages are full except the last, which holds ``kv_last_page_len[b]`` tokens
(1..page_size, or 0 for a request with no page). Token ``t`` of request ``b`` therefore lives in page
``kv_indices[kv_indptr[b] + t // page_size]`` at slot ``t % page_size``.

The cache is a single tensor ``[max_pages, 2, page_size, num_kv_heads, head_dim]`` (``"NHD"``) or
``[max_pages, 2, num_kv_heads, page_size, head_dim]`` (``"HND"``) with K at ``[:, 0]`` and V at
``[:, 1]``, or a ``(k_cache, v_cache)`` tuple of 4-D tensors without the ``2`` axis.
"""
from __future__ import annotations

import torch

__all__ = ["unpack_paged_kv_cache", "get_seq_lens", "block_table_to_csr", "csr_to_block_table",
           "get_batch_indices_positions", "append_paged_kv_cache", "append_paged_kv_cache_with_rope",
           "gather_paged_kv"]


def unpack_paged_kv_cache(paged_kv_cache, kv_layout: str = "NHD") -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_cache, v_cache)`` 4-D views of a 5-D cache tensor, or the tuple itself."""
    if isinstance(paged_kv_cache, torch.Tensor):
        return paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    k_cache, v_cache = paged_kv_cache
    return k_cache, v_cache


def get_seq_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """KV length of each request: ``(num_pages - 1) * page_size + last_page_len`` (0 with no page).

    kv_indptr: int ``[batch + 1]``; kv_last_page_len: int ``[batch]``. Returns int32 ``[batch]``.
    """
    pages = (kv_indptr[1:] - kv_indptr[:-1]).to(torch.int64)
    lens = torch.where(pages > 0, (pages - 1) * page_size + kv_last_page_len.to(torch.int64), 0)
    return lens.to(torch.int32)


def block_table_to_csr(block_table: torch.Tensor, seq_lens: torch.Tensor,
                       page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block table (vLLM / flash-attn form) to FlashInfer's CSR form.

    block_table: int ``[batch, max_blocks]``, row ``b`` lists request b's pages in order (entries past
    ``ceil(seq_lens[b] / page_size)`` are ignored); seq_lens: int ``[batch]``.
    Returns ``(kv_indptr [batch+1], kv_indices [total_pages], kv_last_page_len [batch])``, all int32.
    """
    lens = seq_lens.to(torch.int64)
    pages = (lens + page_size - 1) // page_size
    indptr = torch.zeros(lens.shape[0] + 1, dtype=torch.int64, device=seq_lens.device)
    indptr[1:] = torch.cumsum(pages, 0)
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    indices = block_table[cols[None, :] < pages[:, None].to(block_table.device)]
    last = torch.where(pages > 0, lens - (pages - 1) * page_size, 0)
    return indptr.to(torch.int32), indices.to(torch.int32), last.to(torch.int32)


def csr_to_block_table(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
                       page_size: int, max_blocks: int | None = None,
                       pad_value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR form back to ``(block_table int32 [batch, max_blocks], seq_lens int32 [batch])``.

    ``max_blocks`` defaults to the most pages any request has; unused entries hold ``pad_value``.
    """
    ptr = kv_indptr.to(torch.int64)
    pages = ptr[1:] - ptr[:-1]
    longest = int(pages.max().item()) if pages.numel() else 0
    width = longest if max_blocks is None else int(max_blocks)
    table = torch.full((pages.shape[0], width), pad_value, dtype=torch.int32, device=kv_indices.device)
    cols = torch.arange(width, device=kv_indices.device)
    used = cols[None, :] < pages[:, None]
    table[used] = kv_indices[(ptr[:-1, None] + cols[None, :])[used]].to(torch.int32)
    return table, get_seq_lens(kv_indptr, kv_last_page_len, page_size)


def get_batch_indices_positions(append_indptr: torch.Tensor, seq_lens: torch.Tensor, nnz: int,
                                batch_indices: torch.Tensor | None = None,
                                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Request index and KV position of every appended token.

    append_indptr: int ``[batch + 1]`` (ragged appended tokens); seq_lens: int ``[batch]``, the KV
    length of each request *after* the append. Token ``i`` of request ``b`` (``i`` counted from
    ``append_indptr[b]``) gets ``batch_indices = b`` and ``positions = seq_lens[b] - n_b + i`` where
    ``n_b`` is the number appended. Entries past ``append_indptr[-1]`` (up to ``nnz``) get ``-1``.
    Returns int32 ``[nnz]`` tensors (written into the given ones when passed).
    """
    ptr = append_indptr.to(torch.int64)
    counts = ptr[1:] - ptr[:-1]
    tok = torch.arange(nnz, device=append_indptr.device)
    b = torch.searchsorted(ptr[1:], tok, right=True)
    valid = tok < ptr[-1]
    bc = b.clamp(max=max(counts.shape[0] - 1, 0))
    pos = seq_lens.to(torch.int64).to(tok.device)[bc] - counts[bc] + (tok - ptr[bc]) if counts.numel() else tok
    b = torch.where(valid, b, -1).to(torch.int32)
    pos = torch.where(valid, pos, -1).to(torch.int32)
    if batch_indices is not None:
        batch_indices.copy_(b)
        b = batch_indices
    if positions is not None:
        positions.copy_(pos)
        pos = positions
    return b, pos


def _slots(batch_indices, positions, kv_indices, kv_indptr, page_size):
    """Page id and in-page slot of each appended token (int64)."""
    b = batch_indices.to(torch.int64)
    pos = positions.to(torch.int64)
    page = kv_indices.to(torch.int64)[kv_indptr.to(torch.int64)[b] + pos // page_size]
    return page, pos % page_size


def append_paged_kv_cache(append_key: torch.Tensor, append_value: torch.Tensor, batch_indices: torch.Tensor,
                          positions: torch.Tensor, paged_kv_cache, kv_indices: torch.Tensor,
                          kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor,
                          kv_layout: str = "NHD") -> None:
    """Write ``append_key/value [nnz, num_kv_heads, head_dim]`` into the cache, token ``i`` at
    ``(batch_indices[i], positions[i])``. ``kv_last_page_len`` describes the cache after the append
    and is not needed for the write (kept for FlashInfer's signature)."""
    k_cache, v_cache = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    page_size = k_cache.shape[1] if kv_layout == "NHD" else k_cache.shape[2]
    n = append_key.shape[0]
    page, slot = _slots(batch_indices[:n], positions[:n], kv_indices, kv_indptr, page_size)
    if kv_layout == "NHD":
        k_cache[page, slot] = append_key.to(k_cache.dtype)
        v_cache[page, slot] = append_value.to(v_cache.dtype)
    else:
        k_cache[page, :, slot] = append_key.to(k_cache.dtype)
        v_cache[page, :, slot] = append_value.to(v_cache.dtype)


def gather_paged_kv(paged_kv_cache, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                    kv_last_page_len: torch.Tensor, kv_layout: str = "NHD") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each request's keys and values laid out contiguously: a list of ``(k, v)``, each
    ``[seq_len_b, num_kv_heads, head_dim]`` (the inverse of appending; used by the references)."""
    k_cache, v_cache = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    if kv_layout == "HND":
        k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    page_size = k_cache.shape[1]
    lens = get_seq_lens(kv_indptr, kv_last_page_len, page_size).tolist()
    ptr = kv_indptr.tolist()
    out = []
    for b, n in enumerate(lens):
        pages = kv_indices[ptr[b]:ptr[b + 1]].to(torch.int64)
        k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n]
        v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n]
        out.append((k, v))
    return out


def append_paged_kv_cache_with_rope(append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices,
                                    kv_indptr, kv_last_page_len, kv_layout="NHD", q=None, rotary_dim=None,
                                    interleave=False, rope_scale=1.0, rope_theta=1e4, llama31=False,
                                    low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192) -> None:
    """Reference for `pagoda.ops.page.append_paged_kv_cache_with_rope`: rotate keys (and ``q`` in place) at
    ``positions``, then append. Tokens with a negative batch index are skipped."""
    from pagoda.reference.rope import rope_frequencies, rope_ref

    n = append_key.shape[0]
    freqs = rope_frequencies(append_key.shape[-1] if rotary_dim is None else rotary_dim, rope_scale, rope_theta,
                             llama31, low_freq_factor, high_freq_factor, old_context_len, device=append_key.device)
    pos = positions[:n]
    if q is not None:
        q.copy_(rope_ref(q, pos, freqs, interleave))
    live = batch_indices[:n] >= 0
    rotated = rope_ref(append_key, pos, freqs, interleave)
    append_paged_kv_cache(rotated[live], append_value[live], batch_indices[:n][live], pos[live], paged_kv_cache,
                          kv_indices, kv_indptr, kv_last_page_len, kv_layout)

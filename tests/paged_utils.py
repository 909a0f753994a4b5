"""Test helpers for paged KV caches: random page tables (pages in random order) and filled caches."""
from __future__ import annotations

import torch


def random_page_table(seq_lens, page_size: int, extra_pages: int = 3, device="cpu"):
    """CSR metadata for ``seq_lens`` with page ids drawn in random order from a pool larger than needed.

    Returns ``(kv_indptr, kv_indices, kv_last_page_len, max_pages)`` (int32 tensors, int).
    """
    pages = [-(-n // page_size) for n in seq_lens]
    total = sum(pages)
    max_pages = total + extra_pages
    perm = torch.randperm(max_pages)[:total].to(torch.int32)
    indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(pages, dtype=torch.int64), 0).to(torch.int32)
    last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(seq_lens, pages)], dtype=torch.int32)
    return indptr.to(device), perm.to(device), last.to(device), max_pages


def empty_cache(max_pages, page_size, heads, dim, layout, dtype, device="cpu", tuple_form=False):
    """NaN-filled cache (so a read of an unwritten slot shows up) in the 5-D or tuple form."""
    shape = (max_pages, page_size, heads, dim) if layout == "NHD" else (max_pages, heads, page_size, dim)
    if tuple_form:
        return (torch.full(shape, float("nan"), dtype=dtype, device=device),
                torch.full(shape, float("nan"), dtype=dtype, device=device))
    return torch.full((shape[0], 2, *shape[1:]), float("nan"), dtype=dtype, device=device)


def fill_cache(cache, keys, values, indptr, indices, page_size, layout):
    """Write each request's contiguous ``keys[b]``/``values[b]`` ``[len_b, H, D]`` into its pages (test-side,
    independent of the code under test)."""
    k_cache, v_cache = (cache[:, 0], cache[:, 1]) if isinstance(cache, torch.Tensor) else cache
    ptr = indptr.tolist()
    for b, (k, v) in enumerate(zip(keys, values)):
        t = torch.arange(k.shape[0])
        page = indices.cpu().to(torch.int64)[ptr[b] + t // page_size].to(k_cache.device)
        slot = (t % page_size).to(k_cache.device)
        if layout == "NHD":
            k_cache[page, slot], v_cache[page, slot] = k, v
        else:
            k_cache[page, :, slot], v_cache[page, :, slot] = k, v


def indptr_of(lens, device="cpu") -> torch.Tensor:
    """int32 CSR offsets ``[len(lens) + 1]`` of segments of ``lens``."""
    p = torch.zeros(len(lens) + 1, dtype=torch.int32)
    p[1:] = torch.cumsum(torch.tensor(lens), 0)
    return p.to(device)


def paged_inputs(kv, qo, page_size, hq, hk, d, layout, dtype, device="cpu"):
    """Random queries (``sum(qo)`` rows) and a filled paged cache for requests of ``kv`` keys: ``(q, cache,
    keys, values, (kv_indptr, kv_indices, kv_last_page_len))`` with ``keys``/``values`` lists of ``[kv_b, hk, d]``."""
    indptr, indices, last, max_pages = random_page_table(kv, page_size, device=device)
    cache = empty_cache(max_pages, page_size, hk, d, layout, dtype, device=device)
    keys = [torch.randn(n, hk, d, dtype=dtype, device=device) for n in kv]
    vals = [torch.randn(n, hk, d, dtype=dtype, device=device) for n in kv]
    fill_cache(cache, keys, vals, indptr.cpu(), indices.cpu(), page_size, layout)
    q = torch.randn(sum(qo), hq, d, dtype=dtype, device=device)
    return q, cache, keys, vals, (indptr, indices, last)

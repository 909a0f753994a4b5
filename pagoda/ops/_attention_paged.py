"""`flash_attn_varlen_func(..., block_table=...)`: ragged queries against a paged KV cache, flash-attn 2's form.

The cache is ``k``/``v`` ``[num_blocks, page_block_size, nheads_k, headdim]`` (any page size); sequence ``b`` owns
the pages ``block_table[b]`` and ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` keys. flash-attn's semantics throughout
(bottom-right causal alignment, window, soft cap, ALiBi ``-slope * |q - k|``, natural-log LSE ``[nheads,
total_q]``). The kernel path is pagoda's paged prefill kernel (`pagoda.ops._dispatch.prefill_paged`) over the
block table read as a CSR page table with equal-width rows; elsewhere the reference over the gathered pages.
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks, _paged
from pagoda.reference import attention as _ref


def check_paged_kv(k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor, batch: int, device) -> int:
    """k/v ``[num_blocks, page_size, nheads_k, d]`` and an int32 ``[batch, max_blocks]`` block table on q's device;
    returns the page size."""
    for name, t in (("k", k), ("v", v)):
        _checks.check_tensor(name, t, ndim=4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape with block_table, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    _checks.check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (one per sequence of cu_seqlens_k), "
                         f"got {block_table.shape[0]}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on {device}, got {block_table.device}")
    if block_table.numel() and not _paged.capturing(block_table):
        lo, hi = int(block_table.min()), int(block_table.max())
        if lo < 0 or hi >= k.shape[0]:
            raise ValueError(f"block_table ids must be in [0, {k.shape[0]}) (k's blocks), got [{lo}, {hi}]")
    return k.shape[1]


def paged_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, block_table: torch.Tensor, scale: float,
                 window: tuple[int, int], softcap: float, alibi_slopes: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated arguments -> ``(out [total_q, nheads, d], lse [nheads, total_q] float32 natural log)``; tokens past
    ``cu_seqlens_q[-1]`` get zeros and LSE ``-inf``."""
    batch, width = block_table.shape
    page_size, hk = k.shape[1], k.shape[2]
    hq = q.shape[1]
    left, right = window
    if not _paged.use_triton(q):
        ck = cu_seqlens_k.tolist()
        keys, vals, lens = [], [], []
        for b in range(batch):
            n = ck[b + 1] - ck[b]
            pages = block_table[b].long()
            keys.append(k[pages].reshape(-1, hk, k.shape[-1])[:n])
            vals.append(v[pages].reshape(-1, hk, v.shape[-1])[:n])
            lens.append(n)
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        out, lse, _ = _ref.flash_attn_varlen_func(q, torch.cat(keys), torch.cat(vals), cu_seqlens_q, cu,
                                                  max_seqlen_q, max(lens, default=0), 0.0, scale, False, window,
                                                  softcap, alibi_slopes, False, True)
        return out, lse
    from pagoda.ops._dispatch import prefill_paged

    dev = q.device
    kv_len = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=dev) * width
    # Equal-width rows: a KV length of (width - 1) * page_size + last, last possibly < 1 (see prefill_paged_fwd).
    last = (kv_len - (width - 1) * page_size).to(torch.int32)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((q.shape[0], hq), float("-inf"), dtype=torch.float32, device=dev)
    if batch and max_seqlen_q and width:
        prefill_paged(q, k, v, (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2)),
                      cu_seqlens_q, indptr, block_table.contiguous().view(-1), last, page_size, hk, max_seqlen_q,
                      out, lse, sm_scale=scale, causal=right == 0, window_left=left, window_right=right,
                      logits_soft_cap=softcap, alibi_slopes=alibi_slopes)
    return out, lse.t().contiguous()

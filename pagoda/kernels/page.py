"""Append new keys/values into a paged KV cache: one program per appended token.

Token ``i`` belongs to request ``b = batch_indices[i]`` at KV position ``p = positions[i]``; it goes to
page ``kv_indices[kv_indptr[b] + p // page_size]``, slot ``p % page_size``. Both layouts (NHD/HND) and
the 5-D / tuple cache forms are the same kernel: the caller passes (page, token, head) strides.
A token whose batch index is negative (padding from `get_batch_indices_positions`) is skipped.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _append_kernel(
    K_NEW, V_NEW, BATCH_IDX, POS, KV_INDICES, KV_INDPTR, K_CACHE, V_CACHE,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    num_heads, page_size,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0)
    b = tl.load(BATCH_IDX + tok)
    if b < 0:
        return
    pos = tl.load(POS + tok)
    page_slot = tl.load(KV_INDPTR + b) + pos // page_size
    page = tl.load(KV_INDICES + page_slot).to(tl.int64)
    slot = (pos % page_size).to(tl.int64)

    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HEAD_DIM)
    tok64 = tok.to(tl.int64)
    k = tl.load(K_NEW + tok64 * stride_knt + offs_h[:, None] * stride_knh + offs_d[None, :], mask=mask)
    v = tl.load(V_NEW + tok64 * stride_vnt + offs_h[:, None] * stride_vnh + offs_d[None, :], mask=mask)
    k_dst = K_CACHE + page * stride_kp + slot * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    v_dst = V_CACHE + page * stride_vp + slot * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    tl.store(k_dst, k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(V_CACHE.dtype.element_ty), mask=mask)


def append_paged_kv(append_key, append_value, batch_indices, positions, k_cache, v_cache, kv_indices,
                    kv_indptr, cache_strides_k, cache_strides_v, page_size: int) -> None:
    """Launch the append kernel; arguments are assumed validated by `pagoda.ops.page`.

    append_key/value: ``[nnz, H, D]`` with a contiguous last dim; ``cache_strides_*`` are
    ``(stride_page, stride_token, stride_head)`` of the 4-D caches.
    """
    nnz, heads, dim = append_key.shape
    if nnz == 0:
        return
    dim_pad = triton.next_power_of_2(dim)
    block_h = max(1, min(triton.next_power_of_2(heads), max(1, 4096 // dim_pad)))
    grid = (nnz, triton.cdiv(heads, block_h))
    _append_kernel[grid](
        append_key, append_value, batch_indices, positions, kv_indices, kv_indptr, k_cache, v_cache,
        append_key.stride(0), append_key.stride(1), append_value.stride(0), append_value.stride(1),
        *cache_strides_k, *cache_strides_v, heads, page_size,
        HEAD_DIM=dim, HEAD_DIM_PAD=dim_pad, BLOCK_H=block_h, num_warps=4,
    )

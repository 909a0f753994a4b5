"""Append new keys/values into a paged KV cache: one program per appended token.

Token ``i`` belongs to request ``b = batch_indices[i]`` at KV position ``p = positions[i]``; it goes to
page ``kv_indices[kv_indptr[b] + p // page_size]``, slot ``p % page_size``. Both layouts (NHD/HND) and
the 5-D / tuple cache forms are the same kernel: the caller passes (page, token, head) strides.
A token whose batch index is negative (padding from `get_batch_indices_positions`) is skipped.

With ``ROPE`` the key is rotated on the way (fused "RoPE then append"): dimension ``d < rotary_dim``
becomes ``k[d] cos(a) + sign(d) k[partner(d)] sin(a)`` with ``a = position * freqs[pair(d)]``, where the
pair partner is ``d +- rotary_dim/2`` (sign -/+) or, interleaved, ``d ^ 1`` (sign - for even ``d``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from pagoda.kernels.launch.fast import cdiv, launch, next_pow2


@triton.jit
def _append_kernel(
    K_NEW, V_NEW, BATCH_IDX, POS, KV_INDICES, KV_INDPTR, K_CACHE, V_CACHE, FREQS,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    num_heads, page_size, rotary_dim,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    ROPE: tl.constexpr = False, INTERLEAVE: tl.constexpr = False,
):
    tok = tl.program_id(0)
    b = tl.load(BATCH_IDX + tok)
    if b < 0:
        return
    pos = tl.load(POS + tok)
    page_slot = tl.load(KV_INDPTR + b) + pos // page_size
    page = tl.load(KV_INDICES + page_slot).to(tl.int64)
    slot = (pos % page_size).to(tl.int64)

    offs_h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)   # heads-outermost storage
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HEAD_DIM)
    tok64 = tok.to(tl.int64)
    k_row = K_NEW + tok64 * stride_knt + offs_h[:, None] * stride_knh
    k = tl.load(k_row + offs_d[None, :], mask=mask)
    if ROPE:
        half = rotary_dim // 2
        rot = offs_d < rotary_dim
        if INTERLEAVE:
            partner = offs_d ^ 1
            sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
            pair = offs_d // 2
        else:
            partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
            sign = tl.where(offs_d < half, -1.0, 1.0)
            pair = tl.where(offs_d < half, offs_d, offs_d - half)
        k2 = tl.load(k_row + partner[None, :], mask=mask & rot[None, :], other=0.0)
        ang = pos.to(tl.float32) * tl.load(FREQS + pair, mask=rot, other=0.0)
        k_rot = k.to(tl.float32) * tl.cos(ang)[None, :] + sign[None, :] * k2.to(tl.float32) * tl.sin(ang)[None, :]
        k = tl.where(rot[None, :], k_rot, k.to(tl.float32))
    v = tl.load(V_NEW + tok64 * stride_vnt + offs_h[:, None] * stride_vnh + offs_d[None, :], mask=mask)
    k_dst = K_CACHE + page * stride_kp + slot * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    v_dst = V_CACHE + page * stride_vp + slot * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    tl.store(k_dst, k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(V_CACHE.dtype.element_ty), mask=mask)


def append_paged_kv(append_key, append_value, batch_indices, positions, k_cache, v_cache, kv_indices,
                    kv_indptr, cache_strides_k, cache_strides_v, page_size: int, rope_freqs=None,
                    interleave: bool = False) -> None:
    """Launch the append kernel; arguments are assumed validated by `pagoda.ops.page`.

    append_key/value: ``[nnz, H, D]`` with a contiguous last dim; ``cache_strides_*`` are
    ``(stride_page, stride_token, stride_head)`` of the 4-D caches. ``rope_freqs``: None, or float32
    ``[rotary_dim // 2]`` pair frequencies to rotate the keys with at their positions.
    """
    nnz, heads, dim = append_key.shape
    if nnz == 0:
        return
    dim_pad = next_pow2(dim)
    block_h = max(1, min(next_pow2(heads), max(1, 4096 // dim_pad)))
    grid = (nnz, cdiv(heads, block_h))
    launch(
        _append_kernel, grid,
        append_key, append_value, batch_indices, positions, kv_indices, kv_indptr, k_cache, v_cache,
        rope_freqs if rope_freqs is not None else positions,
        append_key.stride(0), append_key.stride(1), append_value.stride(0), append_value.stride(1),
        *cache_strides_k, *cache_strides_v, heads, page_size,
        2 * rope_freqs.shape[0] if rope_freqs is not None else 0,
        HEAD_DIM=dim, HEAD_DIM_PAD=dim_pad, BLOCK_H=block_h, ROPE=rope_freqs is not None,
        INTERLEAVE=bool(interleave), num_warps=4,
    )

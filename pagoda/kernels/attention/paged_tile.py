"""Pieces shared by the paged-KV attention kernels (decode and paged prefill).

A tile of keys ``t [BLOCK_N]`` of one request is gathered through the page table: key ``t`` lives in
page ``KV_INDICES[p0 + t // page_size]`` at slot ``t % page_size``. Scores are kept in base 2, as in
`pagoda.kernels.attention.fwd`.
"""
import triton
import triton.language as tl

from pagoda.kernels._common import online_softmax, soft_cap


def addr_flags(page_size: int, k_strides, v_strides) -> int:
    """Constexpr ``ADDR`` of the paged kernels: 1 = power-of-two page size, 2 = K and V share (page, token) strides,
    4 = token offsets within a page need 64 bits."""
    wide = page_size * max(abs(k_strides[1]), abs(v_strides[1]), 1) >= 2 ** 31
    return ((page_size & (page_size - 1)) == 0) | 2 * (tuple(k_strides[:2]) == tuple(v_strides[:2])) | 4 * wide


@triton.jit
def rope_rows(x, x_partner, pos, offs_d, rope_rcp_scale, log2_theta, HEAD_DIM: tl.constexpr):
    """Non-interleaved RoPE of rows ``x [R, D]`` at positions ``pos [R]``: x cos + sign * partner sin."""
    half = HEAD_DIM // 2
    i = tl.where(offs_d < half, offs_d, offs_d - half)
    freq = tl.exp2(-(2.0 * i.to(tl.float32) / HEAD_DIM) * log2_theta) * rope_rcp_scale
    ang = pos.to(tl.float32)[:, None] * freq[None, :]
    sign = tl.where(offs_d < half, -1.0, 1.0)
    return x.to(tl.float32) * tl.cos(ang) + sign[None, :] * x_partner.to(tl.float32) * tl.sin(ang)


@triton.jit
def paged_offsets(KV_INDICES, p0, t, valid, page_size, page_shift, stride_kp, stride_kt, stride_vp, stride_vt,
                  MASKED: tl.constexpr, ADDR: tl.constexpr):
    """Element offsets ``(off_k, off_v) [BLOCK_N]`` of keys ``t`` from their KV head's start. ``ADDR`` bits
    (`addr_flags`): 1 power-of-two page (shift and mask instead of an integer
    division, tens of instructions per key), 2 K and V share strides (one offset), 4 64-bit token offsets."""
    if ADDR & 1:
        pidx = t >> page_shift
        slot = t & (page_size - 1)
    else:
        pidx = t // page_size
        slot = t % page_size
    if ADDR & 4:
        slot = slot.to(tl.int64)
    if MASKED:
        page = tl.load(KV_INDICES + p0 + pidx, mask=valid, other=0).to(tl.int64)
    else:
        page = tl.load(KV_INDICES + p0 + pidx).to(tl.int64)
    off_k = page * stride_kp + slot * stride_kt
    if ADDR & 2:
        off_v = off_k
    else:
        off_v = page * stride_vp + slot * stride_vt
    return off_k, off_v


@triton.jit
def load_rows(BASE, off, offs_d, valid, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """``[BLOCK_N, HEAD_DIM_PAD]`` rows at element offsets ``off`` from ``BASE``; masked rows read 0."""
    ptrs = BASE + off[:, None] + offs_d[None, :]
    if MASKED:
        tile = tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM != HEAD_DIM_PAD:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def paged_scores(q, K_H, off_k, t, valid, offs_d, partner, qk_scale, softcap_log2, rope_rcp_scale, log2_theta,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr):
    """Base-2 scores ``[R, BLOCK_N]`` of q ``[R, D]`` against the keys at ``off_k`` of one KV head (``K_H``);
    with MASKED, rows with ``valid == False`` read zeros (the caller masks their scores)."""
    k = load_rows(K_H, off_k, offs_d, valid, MASKED, HEAD_DIM, HEAD_DIM_PAD)
    if ROPE:
        k2 = tl.load(K_H + off_k[:, None] + partner[None, :], mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM),
                     other=0.0)
        k = rope_rows(k, k2, t, offs_d, rope_rcp_scale, log2_theta, HEAD_DIM).to(K_H.dtype.element_ty)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if HAS_SOFTCAP:
        s = soft_cap(qk, qk_scale, softcap_log2)
    else:
        s = qk * qk_scale
    return s


@triton.jit
def softmax_pv_update(acc, l_i, m_i, s, V_H, off_v, valid, offs_d, HEAD_DIM: tl.constexpr,
                      HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update with masked base-2 scores ``s`` (-inf where hidden) and the V rows at ``off_v``."""
    p, alpha, m_new, l_i = online_softmax(s, m_i, l_i, 1.0, True)
    v = load_rows(V_H, off_v, offs_d, valid, MASKED, HEAD_DIM, HEAD_DIM_PAD)
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new

"""Pieces shared by the paged-KV attention kernels (decode and paged prefill).

A tile of keys ``t [BLOCK_N]`` of one request is gathered through the page table: key ``t`` lives in
page ``KV_INDICES[p0 + t // page_size]`` at slot ``t % page_size``. Scores are kept in base 2, as in
`pagoda.kernels.attention_fwd`.
"""
import triton
import triton.language as tl


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
def paged_scores(q, K, KV_INDICES, p0, t, valid, offs_d, partner, kvh, page_size, stride_kp, stride_kt, stride_kh,
                 qk_scale, softcap_log2, rope_rcp_scale, log2_theta, HEAD_DIM: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr):
    """Base-2 scores ``[R, BLOCK_N]`` of q ``[R, D]`` against the gathered keys ``t`` (rows with
    ``valid == False`` read zeros, the caller masks them). Also returns (page, slot, kv_mask) for the V tile."""
    page = tl.load(KV_INDICES + p0 + t // page_size, mask=valid, other=0).to(tl.int64)
    slot = (t % page_size).to(tl.int64)
    kv_mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    k_ptrs = K + (page * stride_kp + slot * stride_kt + kvh * stride_kh)[:, None]
    k = tl.load(k_ptrs + offs_d[None, :], mask=kv_mask, other=0.0)
    if ROPE:
        k2 = tl.load(k_ptrs + partner[None, :], mask=kv_mask, other=0.0)
        k = rope_rows(k, k2, t, offs_d, rope_rcp_scale, log2_theta, HEAD_DIM).to(K.dtype.element_ty)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if HAS_SOFTCAP:
        # softcap * tanh(scale * qk / softcap) in base 2; tanh via exp2 (exact at +-inf).
        x = qk * qk_scale
        s = softcap_log2 * (1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0))
    else:
        s = qk * qk_scale
    return s, page, slot, kv_mask


@triton.jit
def softmax_pv_update(acc, l_i, m_i, s, V, page, slot, kv_mask, kvh, stride_vp, stride_vt, stride_vh, offs_d,
                      IEEE: tl.constexpr):
    """Online-softmax update with masked base-2 scores ``s`` (-inf where hidden) and the gathered V tile."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet: no NaN
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = V + (page * stride_vp + slot * stride_vt + kvh * stride_vh)[:, None]
    v = tl.load(v_ptrs + offs_d[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new

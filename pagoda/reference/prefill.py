"""Plain-PyTorch prefill/append attention (FlashInfer's ``flashinfer.prefill`` semantics).

Request ``b`` has ``qo_len`` queries and ``kv_len`` keys; query ``i`` sits at key position
``i + kv_len - qo_len`` (the queries are the last tokens of the KV: chunked prefill, prefix caching).
``causal`` hides keys after that position; ``window_left >= 0`` hides keys before
``position - window_left``; ``logits_soft_cap``, ``ROPE_LLAMA`` (q at its position, k at its index)
and ``ALIBI``, FlashInfer's signed bias ``slope * (j - position)`` (with or without ``causal``; flash-attn's
``-slope * |position - j|`` equals it only left of the diagonal). Rows that see no key get zeros and LSE ``-inf``;
LSE is natural-log float32 ``[nnz_qo, num_qo_heads]`` (the public FlashInfer-style ops hand it out in base 2).
"""
from __future__ import annotations

import math

import torch

from pagoda.reference.attention import attention_ref
from pagoda.reference.decode import alibi_slopes
from pagoda.reference.page import gather_paged_kv
from pagoda.reference.rope import rope_frequencies, rope_ref

__all__ = ["prefill_one", "batch_prefill_with_paged_kv_cache", "batch_prefill_with_ragged_kv_cache",
           "single_prefill_with_kv_cache"]


def prefill_one(q, k, v, *, causal: bool, sm_scale: float, window_left: int = -1, logits_soft_cap: float = 0.0,
                pos_encoding_mode: str = "NONE", rope_scale: float = 1.0, rope_theta: float = 1e4,
                compute_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[qo_len, Hq, D]``, k/v ``[kv_len, Hk, D]`` -> out ``[qo_len, Hq, D]``, lse ``[qo_len, Hq]`` float32."""
    qo_len, hq, d = q.shape
    kv_len = k.shape[0]
    if kv_len == 0 or qo_len == 0:
        return torch.zeros_like(q), torch.full((qo_len, hq), -math.inf, dtype=torch.float32, device=q.device)
    slopes = None
    if pos_encoding_mode == "ROPE_LLAMA":
        freqs = rope_frequencies(d, rope_scale, rope_theta, device=q.device)
        q = rope_ref(q, torch.arange(qo_len, device=q.device) + kv_len - qo_len, freqs, False)
        k = rope_ref(k, torch.arange(kv_len, device=q.device), freqs, False)
    elif pos_encoding_mode == "ALIBI":
        slopes = alibi_slopes(hq, device=q.device)
    out, lse = attention_ref(q, k, v, softmax_scale=sm_scale, window_left=window_left,
                             window_right=0 if causal else -1, softcap=logits_soft_cap, alibi_slopes=slopes,
                             compute_dtype=compute_dtype, alibi_signed=True)
    return out, lse.transpose(0, 1).contiguous()


def _batch(q, kv_pairs, qo_indptr, **kw):
    ptr = qo_indptr.tolist()
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[0], q.shape[1]), -math.inf, dtype=torch.float32, device=q.device)
    for b, (k, v) in enumerate(kv_pairs):
        o, l = prefill_one(q[ptr[b]:ptr[b + 1]], k, v, **kw)
        out[ptr[b]:ptr[b + 1]] = o
        lse[ptr[b]:ptr[b + 1]] = l
    return out, lse


def batch_prefill_with_paged_kv_cache(q, paged_kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                                      kv_layout="NHD", **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[nnz_qo, Hq, D]`` ragged by ``qo_indptr`` against a paged cache; options as in `prefill_one`."""
    kv = gather_paged_kv(paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout)
    return _batch(q, kv, qo_indptr, **kw)


def batch_prefill_with_ragged_kv_cache(q, k, v, qo_indptr, kv_indptr, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[nnz_qo, Hq, D]``, k/v ``[nnz_kv, Hk, D]``, both ragged by their indptr."""
    kp = kv_indptr.tolist()
    kv = [(k[kp[b]:kp[b + 1]], v[kp[b]:kp[b + 1]]) for b in range(len(kp) - 1)]
    return _batch(q, kv, qo_indptr, **kw)


def single_prefill_with_kv_cache(q, k, v, custom_mask=None, packed_custom_mask=None, causal=False, kv_layout="NHD",
                                 pos_encoding_mode="NONE", use_fp16_qk_reduction=False, sm_scale=None, window_left=-1,
                                 logits_soft_cap=None, rope_scale=None, rope_theta=None, return_lse=False,
                                 compute_dtype=torch.float32):
    """Reference for `pagoda.single_prefill_with_kv_cache`: q ``[qo_len, Hq, D]``, k/v ``[kv_len, Hk, D]`` (NHD)
    or ``[Hk, kv_len, D]`` (HND)."""
    if kv_layout == "HND":
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    out, lse = prefill_one(q, k, v, causal=causal, sm_scale=q.shape[-1] ** -0.5 if sm_scale is None else sm_scale,
                           window_left=window_left, logits_soft_cap=logits_soft_cap or 0.0,
                           pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale or 1.0,
                           rope_theta=rope_theta or 1e4, compute_dtype=compute_dtype)
    return (out, lse) if return_lse else out

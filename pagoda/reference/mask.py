"""Plain-PyTorch prefill with a custom attention mask (FlashInfer's ``custom_mask`` semantics): the CPU path of the
masked prefill wrappers and the test oracle of the masked kernel.

Request ``b`` has ``qo_len`` queries and ``kv_len`` keys; its mask is a bool ``[qo_len, kv_len]`` (True = key
visible), stored flattened and concatenated over the batch (``custom_mask``) or bit-packed little-endian one
request per byte-aligned segment (``packed_custom_mask``, as `pagoda.segment_packbits` makes it). As in
FlashInfer, a custom mask replaces ``causal`` (which is then ignored) and combines with the sliding window:
key ``j`` is visible to query ``i`` iff ``mask[i, j]`` and, with ``window_left >= 0``,
``j >= i + kv_len - qo_len - window_left``. Scores, soft cap, RoPE and ALiBi are those of
`pagoda.reference.prefill` (ALiBi adds ``slope * (j - (i + kv_len - qo_len))``, soft cap first). Rows that see no
key give zeros and LSE ``-inf``; LSE is natural-log float32 ``[qo_len, num_qo_heads]`` (the ops convert it to the
API's base).
"""
from __future__ import annotations

import math

import torch

from pagoda.reference.attention import attention_ref
from pagoda.reference.decode import alibi_slopes
from pagoda.reference.rope import rope_frequencies, rope_ref

__all__ = ["unpack_masks", "masked_prefill_one", "batch_masked_prefill"]


def unpack_masks(packed: torch.Tensor, qo_lens: list[int], kv_lens: list[int]) -> list[torch.Tensor]:
    """Segment-packed little-endian uint8 -> one bool ``[qo_len, kv_len]`` per request (on packed's device)."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = ((packed[:, None] >> shifts) & 1).bool().reshape(-1)
    out, byte = [], 0
    for qo, kv in zip(qo_lens, kv_lens):
        n = qo * kv
        out.append(bits[8 * byte:8 * byte + n].reshape(qo, kv))
        byte += (n + 7) // 8
    return out


def masked_prefill_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, sm_scale: float,
                       window_left: int = -1, logits_soft_cap: float = 0.0, pos_encoding_mode: str = "NONE",
                       rope_scale: float = 1.0, rope_theta: float = 1e4,
                       compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One request: q ``[qo_len, Hq, D]``, k/v ``[kv_len, Hk, D]``, mask bool ``[qo_len, kv_len]``.
    Returns out ``[qo_len, Hq, D]`` (q.dtype) and lse ``[qo_len, Hq]`` float32, natural log."""
    qo_len, hq, d = q.shape
    kv_len, hk, _ = k.shape
    if kv_len == 0 or qo_len == 0:
        return torch.zeros_like(q), torch.full((qo_len, hq), -math.inf, dtype=torch.float32, device=q.device)
    shift = kv_len - qo_len
    pos_q = torch.arange(qo_len, device=q.device) + shift
    pos_k = torch.arange(kv_len, device=q.device)
    if pos_encoding_mode == "ROPE_LLAMA":
        freqs = rope_frequencies(d, rope_scale, rope_theta, device=q.device)
        q = rope_ref(q, pos_q, freqs, False)
        k = rope_ref(k, pos_k, freqs, False)
    slopes = alibi_slopes(hq, device=q.device) if pos_encoding_mode == "ALIBI" else None
    out, lse = attention_ref(q, k, v, softmax_scale=sm_scale, window_left=window_left, softcap=logits_soft_cap,
                             alibi_slopes=slopes, alibi_signed=True, compute_dtype=compute_dtype, mask=mask)
    return out, lse.transpose(0, 1).contiguous()

def batch_masked_prefill(q: torch.Tensor, kv_pairs, qo_indptr: torch.Tensor, masks: list[torch.Tensor],
                         **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[nnz_qo, Hq, D]`` ragged by ``qo_indptr``; ``kv_pairs`` one ``(k, v)`` ``[kv_len, Hk, D]`` per request;
    ``masks`` one bool ``[qo_len, kv_len]`` per request; options as in `masked_prefill_one`. Rows past
    ``qo_indptr[-1]`` are zero with LSE -inf."""
    ptr = qo_indptr.tolist()
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[0], q.shape[1]), -math.inf, dtype=torch.float32, device=q.device)
    for b, ((k, v), m) in enumerate(zip(kv_pairs, masks)):
        o, l = masked_prefill_one(q[ptr[b]:ptr[b + 1]], k, v, m, **kw)
        out[ptr[b]:ptr[b + 1]] = o
        lse[ptr[b]:ptr[b + 1]] = l
    return out, lse

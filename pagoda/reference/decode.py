"""Plain-PyTorch decode attention over a paged KV cache (FlashInfer's ``flashinfer.decode`` semantics).

One query token per request attends to all of that request's keys (the query sits at position
``kv_len - 1``, so there is no causal mask to apply). Options:

* ``window_left >= 0``: only keys ``j >= kv_len - 1 - window_left`` are visible.
* ``logits_soft_cap > 0``: scores ``s = sm_scale * q.k`` become ``cap * tanh(s / cap)``.
* ``pos_encoding_mode="ROPE_LLAMA"``: non-interleaved RoPE over the full head_dim is applied on the
  fly, to q at position ``kv_len - 1`` and to key ``j`` at position ``j`` (``rope_scale``, ``rope_theta``);
  the cache keeps un-rotated keys.
* ``pos_encoding_mode="ALIBI"``: adds ``-slope_h * (kv_len - 1 - j)`` with `alibi_slopes` (after the
  soft cap, as `pagoda.reference.attention` does).

A request with no keys gets zeros and LSE ``-inf``. LSE is natural-log, float32.
"""
from __future__ import annotations

import math

import torch

from pagoda.reference.attention import attention_ref
from pagoda.reference.page import gather_paged_kv
from pagoda.reference.rope import rope_frequencies, rope_ref

__all__ = ["POS_ENCODING_MODES", "alibi_slopes", "decode_one", "decode_masked", "batch_decode_with_paged_kv_cache",
           "single_decode_with_kv_cache"]

POS_ENCODING_MODES = ("NONE", "ROPE_LLAMA", "ALIBI")


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """The ALiBi paper's head slopes, float32 ``[num_heads]``: ``2^(-8 i / n)`` for ``i = 1..n`` with ``n`` the
    largest power of two <= num_heads, then every other slope of the ``2n`` series for the remaining heads."""
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * i / n) for i in range(1, 2 * (num_heads - n), 2)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def decode_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sm_scale: float, window_left: int = -1,
               logits_soft_cap: float = 0.0, pos_encoding_mode: str = "NONE", rope_scale: float = 1.0,
               rope_theta: float = 1e4, compute_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One request: q ``[Hq, D]``, k/v ``[kv_len, Hk, D]`` -> out ``[Hq, D]`` (q.dtype), lse ``[Hq]`` float32."""
    hq, d = q.shape
    kv_len = k.shape[0]
    if kv_len == 0:
        return torch.zeros_like(q), torch.full((hq,), -math.inf, dtype=torch.float32, device=q.device)
    slopes = None
    if pos_encoding_mode == "ROPE_LLAMA":
        freqs = rope_frequencies(d, rope_scale, rope_theta, device=q.device)
        q = rope_ref(q[None], torch.tensor([kv_len - 1], device=q.device), freqs, False)[0]
        k = rope_ref(k, torch.arange(kv_len, device=q.device), freqs, False)
    elif pos_encoding_mode == "ALIBI":
        slopes = alibi_slopes(hq, device=q.device)
    out, lse = attention_ref(q[None], k, v, softmax_scale=sm_scale, window_left=window_left, window_right=-1,
                             softcap=logits_soft_cap, alibi_slopes=slopes, compute_dtype=compute_dtype)
    return out[0], lse[:, 0]


def decode_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                  kv_len: torch.Tensor, *, sm_scale: float, logits_soft_cap: float = 0.0) -> torch.Tensor:
    """Decode over a dense per-request cache with a key mask, batched: q ``[B, Hq, D]``, k/v ``[B, S, Hk, D]``,
    ``kv_len`` int ``[B]`` (keys ``[0, kv_len)`` of a row are candidates), ``key_mask`` None or bool/uint8
    ``[B, >= S]`` (nonzero = seen). Returns out ``[B, Hq, D]`` (q.dtype); a row that sees no key gets zeros."""
    b, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    seen = torch.arange(s, device=q.device)[None, :] < kv_len.to(q.device)[:, None]
    if key_mask is not None:
        seen = seen & (key_mask[:, :s] != 0)
    kf = k.float().repeat_interleave(hq // hk, dim=2)
    vf = v.float().repeat_interleave(hq // hk, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.float(), kf) * sm_scale
    if logits_soft_cap > 0:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    scores = scores.masked_fill(~seen[:, None, :], -math.inf)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)        # rows with nothing seen: NaN -> 0
    return torch.einsum("bhs,bshd->bhd", p, vf).to(q.dtype)


def batch_decode_with_paged_kv_cache(q, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len,
                                     kv_layout="NHD", *, sm_scale=None, window_left=-1, logits_soft_cap=0.0,
                                     pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4,
                                     compute_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[batch, Hq, D]`` against a paged cache -> ``(out [batch, Hq, D], lse [batch, Hq] float32)``."""
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    kv = gather_paged_kv(paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout)
    outs, lses = [], []
    for b, (k, v) in enumerate(kv):
        o, l = decode_one(q[b], k, v, sm_scale=scale, window_left=window_left, logits_soft_cap=logits_soft_cap,
                          pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta,
                          compute_dtype=compute_dtype)
        outs.append(o)
        lses.append(l)
    if not outs:
        return torch.empty_like(q), torch.empty(0, q.shape[1], dtype=torch.float32, device=q.device)
    return torch.stack(outs), torch.stack(lses)


def single_decode_with_kv_cache(q, k, v, kv_layout="NHD", pos_encoding_mode="NONE", use_tensor_cores=False,
                                q_scale=None, k_scale=None, v_scale=None, window_left=-1, logits_soft_cap=None,
                                sm_scale=None, rope_scale=None, rope_theta=None, return_lse=False,
                                compute_dtype=torch.float32):
    """Reference for `pagoda.single_decode_with_kv_cache`: q ``[Hq, D]``, k/v ``[kv_len, Hk, D]`` (NHD) or
    ``[Hk, kv_len, D]`` (HND). Returns out ``[Hq, D]`` (and lse ``[Hq]``)."""
    if kv_layout == "HND":
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    scale *= (q_scale or 1.0) * (k_scale or 1.0)
    out, lse = decode_one(q, k, v, sm_scale=scale, window_left=window_left, logits_soft_cap=logits_soft_cap or 0.0,
                          pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale or 1.0,
                          rope_theta=rope_theta or 1e4, compute_dtype=compute_dtype)
    if v_scale is not None:
        out = (out.to(torch.float32) * v_scale).to(out.dtype)
    return (out, lse) if return_lse else out

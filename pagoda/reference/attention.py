"""Plain-PyTorch attention: the CPU path of `pagoda.ops.attention` and the test oracle.

Semantics are flash-attn 2's:

* scores ``s[i, j] = softmax_scale * <q_i, k_j>``; with ``softcap > 0`` they become
  ``softcap * tanh(s / softcap)``; ALiBi then adds ``-slope * |i + sk - sq - j|``.
* Query ``i`` of a sequence with ``sq`` queries and ``sk`` keys sits at key position
  ``i + sk - sq`` (bottom-right alignment). Key ``j`` is visible iff
  ``i + sk - sq - left <= j <= i + sk - sq + right`` where a negative bound means unbounded;
  ``causal=True`` is ``right = 0``.
* GQA/MQA: query head ``h`` reads KV head ``h // (nheads_q // nheads_kv)``.
* Rows that see no key produce zeros and LSE ``-inf`` (log of an empty sum). flash-attn 2 reports
  ``+inf`` there; ``-inf`` is what makes merging partial states (cascade attention) exact.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention_ref", "flash_attn_func", "flash_attn_varlen_func", "visibility_mask"]


def visibility_mask(seqlen_q: int, seqlen_k: int, window_left: int, window_right: int,
                    device=None) -> torch.Tensor:
    """Bool ``[seqlen_q, seqlen_k]``: True where query i may attend to key j (bounds < 0 = unbounded)."""
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        mask &= j >= i - window_left
    if window_right >= 0:
        mask &= j <= i + window_right
    return mask


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float,
                  window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                  alibi_slopes: torch.Tensor | None = None,
                  compute_dtype: torch.dtype = torch.float32,
                  alibi_signed: bool = False, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for one sequence.

    q: ``[seqlen_q, nheads_q, head_dim]``; k, v: ``[seqlen_k, nheads_kv, head_dim]``;
    alibi_slopes: ``[nheads_q]`` float or None: flash-attn's bias ``-slope * |i + sk - sq - j|``, or with
    ``alibi_signed`` FlashInfer's ``slope * (j - (i + sk - sq))`` (equal left of the diagonal);
    mask: optional bool ``[seqlen_q, seqlen_k]`` (True = visible), intersected with the window.
    Returns ``out [seqlen_q, nheads_q, head_dim]`` (q.dtype) and ``lse [nheads_q, seqlen_q]`` float32.
    """
    sq, hq, d = q.shape
    sk, hk, dv = v.shape
    group = hq // hk
    qc = q.to(compute_dtype).transpose(0, 1)                                 # [hq, sq, d]
    kc = k.to(compute_dtype).transpose(0, 1).repeat_interleave(group, 0)     # [hq, sk, d]
    vc = v.to(compute_dtype).transpose(0, 1).repeat_interleave(group, 0)
    s = torch.matmul(qc, kc.transpose(1, 2)) * softmax_scale                 # [hq, sq, sk]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=q.device)[None, :]
        dist = (i - j).to(compute_dtype) if alibi_signed else (i - j).abs().to(compute_dtype)
        s = s - alibi_slopes.to(compute_dtype)[:, None, None] * dist
    visible = visibility_mask(sq, sk, window_left, window_right, device=q.device)
    if mask is not None:
        visible &= mask.to(device=q.device, dtype=torch.bool)
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)                                          # [hq, sq]
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.matmul(p, vc).transpose(0, 1)                                 # [sq, hq, dv]
    return out.to(q.dtype), lse.to(torch.float32)


def _window(causal: bool, window_size) -> tuple[int, int]:
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return left, right


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                    compute_dtype=torch.float32):
    """Reference for `pagoda.flash_attn_func`: q ``[b, sq, hq, d]``, k/v ``[b, sk, hk, d]``.

    Returns out ``[b, sq, hq, d]``, or ``(out, lse [b, hq, sq] float32, None)`` with return_attn_probs.
    """
    if dropout_p:
        raise NotImplementedError("dropout_p > 0 is not supported (pagoda is an inference library)")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    left, right = _window(causal, window_size)
    outs, lses = [], []
    for b in range(q.shape[0]):
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        o, l = attention_ref(q[b], k[b], v[b], softmax_scale=scale, window_left=left, window_right=right,
                             softcap=softcap, alibi_slopes=slopes, compute_dtype=compute_dtype)
        outs.append(o)
        lses.append(l)
    if not outs:  # batch 0: nothing to attend, but keep the documented shapes
        b, sq, hq, _ = q.shape
        out = q.new_empty(b, sq, hq, v.shape[-1])
        lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    else:
        out, lse = torch.stack(outs), torch.stack(lses)
    if return_attn_probs:
        return out, lse, None
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False,
                           block_table=None, compute_dtype=torch.float32):
    """Reference for `pagoda.flash_attn_varlen_func`: q ``[total_q, hq, d]``, k/v ``[total_k, hk, d]``.

    Returns out ``[total_q, hq, d]``, or ``(out, lse [hq, total_q] float32, None)``.
    """
    if dropout_p:
        raise NotImplementedError("dropout_p > 0 is not supported (pagoda is an inference library)")
    if block_table is not None:
        raise NotImplementedError("block_table in flash_attn_varlen_func: use flash_attn_with_kvcache")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    left, right = _window(causal, window_size)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b]:
            continue
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        o, l = attention_ref(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], softmax_scale=scale,
                             window_left=left, window_right=right, softcap=softcap, alibi_slopes=slopes,
                             compute_dtype=compute_dtype)
        out[cq[b]:cq[b + 1]] = o
        lse[:, cq[b]:cq[b + 1]] = l
    if return_attn_probs:
        return out, lse, None
    return out

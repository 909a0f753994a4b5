"""Merging partial attention states (v, s) computed over disjoint KV segments: reference.

For segments A and B of the same query, with natural-log LSEs ``s_a``, ``s_b`` and normalised
outputs ``v_a``, ``v_b``:

    s = log(e^{s_a} + e^{s_b}),   v = (e^{s_a - s} v_a + e^{s_b - s} v_b)

which equals attention over the concatenated segment exactly. An empty segment has LSE ``-inf`` and
weight 0; merging two empty states gives ``v = 0`` and ``s = -inf`` (never NaN).

``base2=True`` takes and returns base-2 LSEs (FlashInfer's convention: ``s = m log2(e) + log2(d)``,
``s = log2(2^{s_a} + 2^{s_b})``), which the public `pagoda.merge_state` family uses.
"""
from __future__ import annotations

import math

import torch

__all__ = ["merge_state", "merge_state_in_place", "merge_states"]


def merge_states(v: torch.Tensor, s: torch.Tensor, base2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """v ``[seq_len, num_states, num_heads, head_dim]``, s ``[seq_len, num_states, num_heads]`` float32.

    Returns ``(V [seq_len, num_heads, head_dim] (v.dtype), S [seq_len, num_heads] float32)``; LSEs in base 2
    with ``base2``, natural log otherwise.
    """
    s32 = s.float() * math.log(2.0) if base2 else s.float()
    s_max = s32.amax(dim=1, keepdim=True)
    s_max = torch.where(torch.isneginf(s_max), torch.zeros_like(s_max), s_max)
    w = torch.exp(s32 - s_max)                                  # [seq, states, heads]; empty -> 0
    total = w.sum(dim=1)                                        # [seq, heads]
    out = (w[..., None] * v.float()).sum(dim=1) / torch.where(total > 0, total, 1.0)[..., None]
    lse = torch.where(total > 0, s_max.squeeze(1) + torch.log(torch.where(total > 0, total, 1.0)),
                      torch.full_like(total, float("-inf")))
    return out.to(v.dtype), (lse * (1.0 / math.log(2.0)) if base2 else lse)


def merge_state(v_a, s_a, v_b, s_b, base2: bool = False):
    """Two states ``[seq_len, num_heads, head_dim]`` / ``[seq_len, num_heads]`` -> merged (V, S)."""
    return merge_states(torch.stack([v_a, v_b], dim=1), torch.stack([s_a, s_b], dim=1), base2)


def merge_state_in_place(v, s, v_other, s_other, mask=None, base2: bool = False) -> None:
    """Merge (v_other, s_other) into (v, s) in place; rows where ``mask [seq_len]`` is False are kept."""
    out, lse = merge_state(v, s, v_other, s_other, base2)
    if mask is not None:
        keep = ~mask.bool()
        out = torch.where(keep[:, None, None], v, out)
        lse = torch.where(keep[:, None], s, lse)
    v.copy_(out)
    s.copy_(lse)

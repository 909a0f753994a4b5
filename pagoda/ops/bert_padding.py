"""flash-attn's padding helpers (``flash_attn.bert_padding``): between a padded batch and the packed tokens that
the varlen entry points take. Plain PyTorch (gathers and scatters), any device.
"""
from __future__ import annotations

import torch

__all__ = ["unpad_input", "pad_input"]


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Keep the tokens a mask selects, as flash-attn 2.7+ does.

    Args:
        hidden_states: ``[batch, seqlen, ...]``.
        attention_mask: bool/int ``[batch, seqlen]``, nonzero = a real token.
        unused_mask: optional ``[batch, seqlen]``: tokens allocated but unused (kept in the output and counted
            in ``cu_seqlens``, not in ``seqused``).
    Returns:
        ``(hidden_states [total, ...], indices [total] int64 into the flattened batch, cu_seqlens [batch + 1]
        int32, max_seqlen int, seqused [batch] int32)``.
    """
    if hidden_states.dim() < 2 or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"attention_mask must have shape {tuple(hidden_states.shape[:2])} (batch, seqlen) of "
                         f"hidden_states, got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    if unused_mask is not None:
        keep = keep | unused_mask.bool()
    seqlens = keep.sum(dim=-1, dtype=torch.int32)
    used = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return hidden_states.flatten(0, 1)[indices], indices, cu_seqlens, max_seqlen, used


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of `unpad_input`: ``hidden_states [total, ...]`` scattered to ``[batch, seqlen, ...]`` (zeros
    elsewhere)."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])

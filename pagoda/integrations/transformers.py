"""Hugging Face transformers integration: ``attn_implementation="pagoda"``.

    import pagoda.integrations.transformers as pt
    pt.register()                       # once per process
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="pagoda")

Every attention call of the model then runs through `pagoda.flash_attn_func` (no mask: prefill of
equal-length sequences, or decode) or `pagoda.flash_attn_varlen_func` (padding, static-cache slots):
the 4-D mask HF builds is read back into per-sequence key/query sets, checked to be exactly
"causal (bottom-right) + sliding window over the valid keys", and the valid tokens are packed into a
ragged batch. A mask of any other shape (custom masks, packed documents) is handled exactly by
falling back to torch SDPA with that mask for that call.
"""
from __future__ import annotations

import torch

from pagoda.ops.attention import flash_attn_func, flash_attn_varlen_func

__all__ = ["register", "pagoda_attention_forward", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "pagoda"


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register pagoda with transformers' attention and mask interfaces under ``name``; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, pagoda_attention_forward)
    # SDPA's mask builder: a boolean [b, 1, q, k] mask, or None when the plain causal mask suffices.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Boolean [b, q, k] 'may attend' from HF's 4-D mask (bool, or additive float with 0 = attend)."""
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be 4-D [batch, heads|1, q, k], got shape {tuple(mask.shape)}")
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if allowed.shape[1] != 1 and not bool((allowed == allowed[:, :1]).all()):
        return None  # per-head masks: not a padding/causal pattern
    return allowed[:, 0]


def _ragged_layout(allowed: torch.Tensor, causal: bool, window_left: int):
    """If ``allowed`` [b, q, k] is exactly causal+window over each row's valid keys, return the valid
    query/key masks ``[b, q]``, ``[b, k]``; else None."""
    valid_k = allowed.any(dim=1)                       # keys anyone may see
    valid_q = allowed.any(dim=2)                       # queries that see something
    rank_k = valid_k.cumsum(dim=1) - 1                 # compact key index
    rank_q = valid_q.cumsum(dim=1) - 1
    shift = valid_k.sum(dim=1) - valid_q.sum(dim=1)    # bottom-right alignment per sequence
    pos_q = (rank_q + shift[:, None])[:, :, None]      # [b, q, 1]
    expected = valid_q[:, :, None] & valid_k[:, None, :]
    if causal:
        expected &= rank_k[:, None, :] <= pos_q
    if window_left >= 0:
        expected &= rank_k[:, None, :] >= pos_q - window_left
    if not torch.equal(expected, allowed):
        return None
    return valid_q, valid_k


def _cu_seqlens(valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    lens = valid.sum(dim=1, dtype=torch.int32)
    cu = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device=valid.device)
    cu[1:] = lens.cumsum(0)
    return cu, int(lens.max().item()) if lens.numel() else 0


def pagoda_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             sliding_window: int | None = None, softcap: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function. query ``[b, hq, q, d]``, key/value ``[b, hk, k, d]``.

    Returns ``(attn_output [b, q, hq, d], None)`` (attention weights are never materialised).
    """
    if dropout and module.training:
        raise NotImplementedError("pagoda attention is inference-only: dropout is not supported in training mode")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window_left = int(sliding_window) - 1 if sliding_window else -1
    window = (window_left, 0 if causal else -1) if window_left >= 0 else (-1, -1)
    cap = float(softcap) if softcap else 0.0
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)   # [b, s, h, d] views

    if attention_mask is None:
        out = flash_attn_func(q, k, v, softmax_scale=scaling, causal=causal, window_size=window, softcap=cap)
        return out, None

    allowed = _allowed(attention_mask)
    layout = None if allowed is None else _ragged_layout(allowed, causal, window_left)
    if layout is None:
        return _sdpa_fallback(module, query, key, value, attention_mask, scaling, cap, window_left), None
    valid_q, valid_k = layout
    cu_q, max_q = _cu_seqlens(valid_q)
    cu_k, max_k = _cu_seqlens(valid_k)
    packed = flash_attn_varlen_func(q[valid_q], k[valid_k], v[valid_k], cu_q, cu_k, max_q, max_k,
                                    softmax_scale=scaling, causal=causal, window_size=window, softcap=cap)
    out = torch.zeros_like(q)
    out[valid_q] = packed
    return out, None


def _sdpa_fallback(module, query, key, value, attention_mask, scaling, softcap, window_left):
    """Exact attention under an arbitrary mask (used only for masks that are not padding + causal)."""
    if softcap:
        raise NotImplementedError("pagoda attention: soft-capping with a non causal/padding mask is not supported")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()

"""Attention over the paged KV cache: fused RoPE + KV append, then the step's planned wrapper.

Every layer of a step shares one page table and one planned wrapper (`ForwardContext`); a layer only
owns its slice of the cache. The engine allocates the caches and assigns each layer's ``kv_cache``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagoda.models.layers.context import get_forward_context
from pagoda.models.layers.rotary import RopeConfig
from pagoda.ops.page import _append_with_rope  # pagoda.append_paged_kv_cache_with_rope, values optionally trusted

__all__ = ["PagedAttention", "KVCacheSpec"]


@dataclass(slots=True, frozen=True)
class KVCacheSpec:
    """What the engine needs to allocate the KV cache: one ``[num_pages, 2, page_size, num_kv_heads,
    head_dim]`` tensor of ``dtype`` per layer (``num_kv_heads`` of this tensor-parallel rank)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


class PagedAttention(nn.Module):
    """RoPE + causal attention of this step's tokens over each request's paged KV.

    Args:
        num_heads, num_kv_heads: query and KV heads of this rank; head_dim: per head.
        rope: RoPE settings (the rotation is fused into the KV append).

    ``kv_cache``: ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (NHD), the model dtype, set by
    the engine before the first step.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rope: RopeConfig):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope = rope
        self._rope_kwargs = rope.append_kwargs()
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[T, num_heads, head_dim]``, k/v ``[T, num_kv_heads, head_dim]`` (this step's tokens, not yet
        rotated) -> ``[T, num_heads, head_dim]``.

        Rotates q in place, writes rotated k and v into ``kv_cache`` at the context's positions
        (`pagoda.append_paged_kv_cache_with_rope`; the metadata's values are checked unless the
        context says ``validate=False``), then
        attends with the context's planned wrapper. Without a ``kv_cache`` (a profiling pass before the
        cache exists) the attention is skipped and zeros come out.
        """
        if self.kv_cache is None:
            return torch.zeros_like(q)
        ctx = get_forward_context()
        if q.stride(-1) != 1:
            q = q.contiguous()
        _append_with_rope(k, v, ctx.batch_indices, ctx.positions, self.kv_cache, ctx.kv_indices, ctx.kv_indptr,
                          ctx.kv_last_page_len, "NHD", q=q, check_values=ctx.validate, **self._rope_kwargs)
        return ctx.wrapper.run(q, self.kv_cache)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, rope={self.rope}"

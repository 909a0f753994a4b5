"""FlashInfer's two-level shared-prefix wrappers (``flashinfer.cascade``, the API before the multi-level one).

The shared prefix's keys/values are dense tensors ``[shared_len, Hk, D]`` (NHD) or ``[Hk, shared_len, D]`` (HND)
every query attends to in full; each request's own keys sit in a paged cache. A forward runs the queries against
the prefix as one non-causal prefill (`single_prefill_with_kv_cache`: the prefix is read once for the whole batch),
against the unique pages with the decode or prefill wrapper, and merges the two states through their base-2 LSEs
(`merge_state_in_place`). Causal masking (prefill stage) applies to the unique part only, aligned to its end; the
prefix is entirely in every query's past. `MultiLevelCascadeAttentionWrapper` is the general form.
"""
from __future__ import annotations

import torch

from pagoda.ops.cascade import merge_state_in_place
from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper
from pagoda.ops.prefill import BatchPrefillWithPagedKVCacheWrapper, single_prefill_with_kv_cache

__all__ = ["BatchDecodeWithSharedPrefixPagedKVCacheWrapper", "BatchPrefillWithSharedPrefixPagedKVCacheWrapper"]

PagedKV = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class BatchDecodeWithSharedPrefixPagedKVCacheWrapper:
    """Batch decode over a shared prefix (dense k/v) plus each request's unique paged KV (FlashInfer's wrapper).

    Example:
        >>> w = pagoda.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(workspace, "NHD")
        >>> w.begin_forward(unique_indptr, unique_indices, unique_last_page_len, 32, 8, 128, 16)
        >>> out = w.forward(q, k_shared, v_shared, unique_kv_cache)    # q [batch, 32, 128] -> out like q
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        self._batch_decode_wrapper = BatchDecodeWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout)
        self._kv_layout = kv_layout

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: torch.Tensor | None = None) -> None:
        """Swap the workspace (as `BatchDecodeWithPagedKVCacheWrapper.reset_workspace_buffer`; re-plan after)."""
        self._batch_decode_wrapper.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)

    def begin_forward(self, unique_kv_indptr: torch.Tensor, unique_kv_indices: torch.Tensor,
                      unique_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int, data_type: str | torch.dtype = "float16") -> None:
        """Plan the unique part: int32 CSR page table of each request's own pages (``[batch + 1]``, the page ids,
        ``[batch]`` last-page lengths), head counts, head_dim, page_size and the q/kv dtype."""
        self._batch_decode_wrapper.plan(unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len, num_qo_heads,
                                        num_kv_heads, head_dim, page_size, pos_encoding_mode="NONE",
                                        data_type=data_type)

    def forward(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor,
                unique_kv_cache: PagedKV) -> torch.Tensor:
        """``q [batch, Hq, D]`` against ``k_shared``/``v_shared`` (every request's prefix, in the wrapper's layout)
        and ``unique_kv_cache`` (5-D or ``(k, v)`` paged cache) -> ``out [batch, Hq, D]``."""
        w = self._batch_decode_wrapper
        if not w._planned:
            raise RuntimeError("call begin_forward() before forward()")
        sm_scale = w._opts[1]
        v_shared_out, s_shared = single_prefill_with_kv_cache(q, k_shared, v_shared, causal=False,
                                                              kv_layout=self._kv_layout, sm_scale=sm_scale,
                                                              return_lse=True)
        v_unique, s_unique = w.run(q, unique_kv_cache, return_lse=True)
        merge_state_in_place(v_shared_out, s_shared, v_unique, s_unique)
        return v_shared_out

    def end_forward(self) -> None:
        """Kept for compatibility; nothing to release."""


class BatchPrefillWithSharedPrefixPagedKVCacheWrapper:
    """Batch prefill/append over a shared prefix (dense k/v) plus each request's unique paged KV (FlashInfer's).

    Example:
        >>> w = pagoda.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(workspace, "NHD")
        >>> w.begin_forward(qo_indptr, unique_indptr, unique_indices, unique_last_page_len, 32, 8, 128, 16)
        >>> out = w.forward(q, k_shared, v_shared, unique_kv_cache, causal=True)   # q [nnz, 32, 128]
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        self._batch_prefill_wrapper = BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout)
        self._kv_layout = kv_layout

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: torch.Tensor | None = None) -> None:
        """Swap the workspace (as `BatchPrefillWithPagedKVCacheWrapper.reset_workspace_buffer`)."""
        self._batch_prefill_wrapper.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)

    def begin_forward(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, paged_kv_indices: torch.Tensor,
                      paged_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int) -> None:
        """Plan the unique part: int32 ``qo_indptr [batch + 1]`` and the CSR page table of each request's pages.
        FlashInfer's signature has no dtype: the plan assumes float16, and the first `forward` with another q/cache
        dtype re-plans once for it."""
        self._plan_args = (qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                           num_kv_heads, head_dim, page_size)
        self._batch_prefill_wrapper.plan(*self._plan_args)

    def forward(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor, unique_kv_cache: PagedKV,
                causal: bool = False, use_fp16_qk_reduction: bool = False, sm_scale: float | None = None,
                rope_scale: float | None = None, rope_theta: float | None = None) -> torch.Tensor:
        """``q [qo_indptr[-1], Hq, D]`` against the shared prefix and ``unique_kv_cache`` -> out like q. ``causal``
        masks the unique keys only (query ``i`` of a request sees its unique keys up to ``i + kv_len - qo_len``);
        ``sm_scale`` defaults to ``head_dim ** -0.5``; rope_scale/rope_theta are accepted (no RoPE is applied, as in
        FlashInfer's ``pos_encoding_mode="NONE"``)."""
        w = self._batch_prefill_wrapper
        if not w._planned:
            raise RuntimeError("call begin_forward() before forward()")
        kv_dtype = (unique_kv_cache[0] if isinstance(unique_kv_cache, (tuple, list)) else unique_kv_cache).dtype
        if (q.dtype, kv_dtype) != (w._q_dtype, w._kv_dtype):
            w.plan(*self._plan_args, q_data_type=q.dtype, kv_data_type=kv_dtype)
        v_shared_out, s_shared = single_prefill_with_kv_cache(
            q, k_shared, v_shared, causal=False, kv_layout=self._kv_layout,
            use_fp16_qk_reduction=use_fp16_qk_reduction, sm_scale=sm_scale, rope_scale=rope_scale,
            rope_theta=rope_theta, return_lse=True)
        v_unique, s_unique = w.forward_return_lse(
            q, unique_kv_cache, causal=causal, pos_encoding_mode="NONE",
            use_fp16_qk_reduction=use_fp16_qk_reduction, sm_scale=sm_scale, rope_scale=rope_scale,
            rope_theta=rope_theta)
        merge_state_in_place(v_shared_out, s_shared, v_unique, s_unique)
        return v_shared_out

    def end_forward(self) -> None:
        """Kept for compatibility; nothing to release."""

"""FlashInfer's CUDA-graph decode entry points (``flashinfer.decode``): the older graph wrapper and the fast re-plan.

* `CUDAGraphBatchDecodeWithPagedKVCacheWrapper`: `BatchDecodeWithPagedKVCacheWrapper` with ``use_cuda_graph=True``
  and its three page-table buffers given positionally (FlashInfer's constructor).
* `fast_decode_plan(wrapper, ...)`: the plan SGLang's multi-step draft backend swaps in (``wrapper.plan =
  functools.partial(fast_decode_plan, wrapper)``): the same plan without host-side value checks, reading only
  ``indptr`` on the host (or the caller's CPU copy ``global_override_indptr_cpu``), and, for a CUDA-graph wrapper,
  taking the page-table buffers as already written by the caller (no device copies; the batch must be the
  wrapper's fixed batch size).
"""
from __future__ import annotations

import torch

from pagoda.ops import _decode_multi
from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper

__all__ = ["CUDAGraphBatchDecodeWithPagedKVCacheWrapper", "fast_decode_plan"]


class CUDAGraphBatchDecodeWithPagedKVCacheWrapper(BatchDecodeWithPagedKVCacheWrapper):
    """Batch decode whose `run` can be captured in a CUDA graph and replayed after any re-plan.

    Args:
        workspace_buffer: the float workspace (as `BatchDecodeWithPagedKVCacheWrapper`'s).
        indptr_buffer: int32 device ``[max_batch_size + 1]``; indices_buffer: int32 device ``[max_num_pages]``;
        last_page_len_buffer: int32 device ``[max_batch_size]``: plan writes the page table there.
        kv_layout: ``"NHD"`` or ``"HND"``; use_tensor_cores: as the base wrapper's.

    Example:
        >>> w = pagoda.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(ws, indptr_buf, indices_buf, last_buf)
        >>> w.plan(indptr, indices, last_page_len, 32, 8, 128, 16, q_data_type=torch.bfloat16)
        >>> with torch.cuda.graph(g):
        ...     out = w.run(q, kv_cache)
        >>> w.plan(new_indptr, new_indices, new_last_page_len, 32, 8, 128, 16, q_data_type=torch.bfloat16)
        >>> g.replay()                                   # out now holds the new batch's attention
    """

    def __init__(self, workspace_buffer: torch.Tensor, indptr_buffer: torch.Tensor, indices_buffer: torch.Tensor,
                 last_page_len_buffer: torch.Tensor, kv_layout: str = "NHD", use_tensor_cores: bool = False) -> None:
        super().__init__(workspace_buffer, kv_layout, use_cuda_graph=True, use_tensor_cores=use_tensor_cores,
                         paged_kv_indptr_buffer=indptr_buffer, paged_kv_indices_buffer=indices_buffer,
                         paged_kv_last_page_len_buffer=last_page_len_buffer)


def fast_decode_plan(self: BatchDecodeWithPagedKVCacheWrapper, indptr: torch.Tensor, indices: torch.Tensor,
                     last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                     pos_encoding_mode: str = "NONE", window_left: int = -1, logits_soft_cap: float | None = None,
                     q_data_type: str | torch.dtype | None = None, kv_data_type: str | torch.dtype | None = None,
                     data_type: str | torch.dtype | None = None, sm_scale: float | None = None,
                     rope_scale: float | None = None, rope_theta: float | None = None, non_blocking: bool = True,
                     fixed_split_size: int | None = None, disable_split_kv: bool = False, q_len_per_req: int = 1,
                     global_override_indptr_cpu: torch.Tensor | None = None) -> None:
    """`BatchDecodeWithPagedKVCacheWrapper.plan` for ``self`` (a decode wrapper, FlashInfer's first argument) without
    its host-side checks: same arguments and semantics, less host work per step.

    * Only ``indptr`` is read on the host, from ``global_override_indptr_cpu`` when given (no device-to-host copy);
      ``last_page_len`` too when ``q_len_per_req > 1`` (as FlashInfer's tensor-core path). Page ids and lengths are
      not validated: a wrong table gives wrong results, not an error.
    * A CUDA-graph wrapper: ``indptr``/``indices``/``last_page_len`` must already be in its buffers (they are usually
      the buffers themselves); nothing is copied, and the batch must equal the buffers' batch size (ValueError).
      Otherwise the given device tensors are used as they are.
    * ``q_len_per_req > 1`` needs a wrapper planned before (ValueError, as FlashInfer) with ``use_tensor_cores``.
    """
    if not isinstance(self, BatchDecodeWithPagedKVCacheWrapper):
        raise TypeError(f"fast_decode_plan's first argument must be a BatchDecodeWithPagedKVCacheWrapper, got "
                        f"{type(self).__name__}")
    n = _decode_multi.check_q_len(q_len_per_req, self.use_tensor_cores, self._backend,
                                  getattr(self, "_graph_q_len", None))
    if n > 1 and not hasattr(self, "_multi"):   # set by every plan (FlashInfer resolves its backend there)
        raise ValueError("fast_decode_plan with q_len_per_req > 1 requires a prior plan() call that resolves the "
                         "backend")
    self._plan_impl(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                    pos_encoding_mode, window_left, logits_soft_cap, q_data_type, kv_data_type, None, data_type,
                    sm_scale, rope_scale, rope_theta, non_blocking, None, None, fixed_split_size, disable_split_kv,
                    n, fast=True, indptr_host=global_override_indptr_cpu)

"""Multi-token decode rows: ``BatchDecodeWithPagedKVCacheWrapper.plan(..., q_len_per_req=n)`` with ``n > 1``.

Speculative verification runs the decode wrapper with ``n`` query tokens per request, ``q`` laid out
``[batch * n, num_qo_heads, head_dim]`` (request-major), each request's tokens being the last ``n`` keys of its
cache and causal among themselves: token ``t`` of a request with ``kv_len`` keys sees keys ``0 .. kv_len - n + t``.
That is FlashInfer's tensor-core decode, which runs its prefill kernel with ``qo_indptr = arange(batch + 1) * n``;
pagoda does the same with its paged prefill (Triton, GQA rows packed so ``n * group`` rows fill a tile), inside a
`BatchPrefillWithPagedKVCacheWrapper` owned by the decode wrapper. Under ``use_cuda_graph=True`` that inner
wrapper is a CUDA-graph one over the decode wrapper's own page-table buffers, so a captured ``run`` replays
after any re-plan of the same ``n`` (FlashInfer freezes ``n`` with the graph, and so does pagoda).

Errors follow FlashInfer's: ``n > 1`` needs ``use_tensor_cores=True`` (ValueError), every request needs
``kv_len >= n`` (ValueError: the earlier rows would see an empty KV range), the ``fa3`` backend refuses ``n > 1``
(NotImplementedError), and a CUDA-graph wrapper cannot change ``n`` (ValueError).
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks


def check_q_len(q_len_per_req, use_tensor_cores: bool, backend: str, graph_q_len: int | None) -> int:
    """Validate ``q_len_per_req`` as FlashInfer's plan does; return it as an int."""
    n = _checks.check_int("q_len_per_req", q_len_per_req)
    if n < 1:
        raise ValueError(f"q_len_per_req must be >= 1, got {n}")
    if graph_q_len is not None and graph_q_len != n:
        raise ValueError(f"q_len_per_req is part of the frozen CUDA-graph shape: this wrapper was planned with "
                         f"{graph_q_len}, got {n}; use a separate wrapper per q_len_per_req")
    if n > 1 and not use_tensor_cores:
        raise ValueError("q_len_per_req > 1 requires tensor-core decode: construct the wrapper with "
                         "use_tensor_cores=True (as FlashInfer requires)")
    if n > 1 and backend == "fa3":
        raise NotImplementedError("q_len_per_req > 1 is supported on the fa2 (and 'auto') backend, not fa3")
    return n


class MultiTokenPlan:
    """The inner prefill wrapper of a decode wrapper planned with ``q_len_per_req > 1`` (kept across plans: a
    captured CUDA graph holds its buffers)."""

    def __init__(self, workspace: torch.Tensor, kv_layout: str, graph_bufs: tuple | None):
        from pagoda.ops.prefill import BatchPrefillWithPagedKVCacheWrapper

        self.q_len = 0
        self.batch = 0
        if graph_bufs is None:
            self.qo_indptr = None
            self.wrapper = BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout)
        else:
            indptr_buf, indices_buf, last_buf = graph_bufs
            self.qo_indptr = torch.zeros_like(indptr_buf)
            self.wrapper = BatchPrefillWithPagedKVCacheWrapper(
                workspace, kv_layout, use_cuda_graph=True, qo_indptr_buf=self.qo_indptr,
                paged_kv_indptr_buf=indptr_buf, paged_kv_indices_buf=indices_buf,
                paged_kv_last_page_len_buf=last_buf)

    def plan(self, indptr, indices, last_page_len, kv_lens: list, num_qo_heads: int, num_kv_heads: int,
             head_dim: int, page_size: int, q_len: int, *, pos_encoding_mode: str, window_left: int,
             logits_soft_cap: float, sm_scale: float, rope_scale: float, rope_theta: float, q_dtype, kv_dtype,
             non_blocking: bool, fixed_split_size: int | None, disable_split_kv: bool) -> None:
        """Plan the inner causal prefill with ``q_len`` queries per request (``kv_lens``: host lengths)."""
        short = [i for i, n in enumerate(kv_lens) if n < q_len]
        if short:
            raise ValueError(f"q_len_per_req={q_len} requires kv_len >= q_len_per_req for every request (the "
                             f"verified tokens must already be appended to the KV cache), but request {short[0]} "
                             f"has kv_len={kv_lens[short[0]]}: its earlier rows would attend to an empty KV range")
        batch = len(kv_lens)
        qo_indptr = torch.arange(batch + 1, dtype=torch.int32, device=indptr.device) * q_len
        self.wrapper.plan(qo_indptr, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                          causal=True, pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale, window_left=window_left,
                          logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
                          q_data_type=q_dtype, kv_data_type=kv_dtype, non_blocking=non_blocking,
                          fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv)
        self.q_len, self.batch = q_len, batch

    def run(self, q, paged_kv_cache, *, q_scale, k_scale, v_scale, out, lse, return_lse, window_left):
        """``q [batch * q_len, Hq, D]`` (a CUDA-graph wrapper: ``[max_batch * q_len, ...]``) -> out like q, or
        ``(out, lse [rows, Hq])`` base 2 (the prefill wrapper's convention, FlashInfer's)."""
        _checks.check_tensor("q", q, ndim=3)
        rows = self.batch * self.q_len
        graph_rows = None if self.qo_indptr is None else (self.qo_indptr.shape[0] - 1) * self.q_len
        if q.shape[0] not in (rows, graph_rows):
            raise ValueError(f"q has {q.shape[0]} rows but plan() used q_len_per_req={self.q_len} for "
                             f"{self.batch} requests: q must be [batch_size * q_len_per_req = {rows}, num_qo_heads, "
                             f"head_dim] (re-plan with the matching q_len_per_req)")
        return self.wrapper.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, out=out,
                                lse=lse, return_lse=return_lse, window_left=window_left)


def plan_multi(wrapper, indptr, indices, last_page_len, kv_lens: list, q_len: int, **plan_kwargs) -> MultiTokenPlan:
    """Plan a decode wrapper's multi-token rows (arguments of `MultiTokenPlan.plan` after the page table); the inner
    prefill wrapper is made once per wrapper (and per workspace), so a captured CUDA graph keeps its buffers."""
    mp = getattr(wrapper, "_multi_plan", None)
    if mp is None or mp.wrapper._workspace is not wrapper._workspace:
        bufs = (wrapper._indptr_buf, wrapper._indices_buf, wrapper._last_buf) if wrapper._use_cuda_graph else None
        mp = wrapper._multi_plan = MultiTokenPlan(wrapper._workspace, wrapper._kv_layout, bufs)
    mp.plan(indptr, indices, last_page_len, kv_lens, q_len=q_len, **plan_kwargs)
    return mp

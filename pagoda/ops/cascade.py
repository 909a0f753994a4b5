"""Cascade attention building blocks, FlashInfer-compatible: merging attention states by LSE.

LSEs are float32 **base 2**, as in FlashInfer (``s = m * log2(e) + log2(sum)``, merged with ``exp2``/``log2``),
``-inf`` for an empty segment: exactly what pagoda's FlashInfer-style ops return with ``return_lse=True``
(the wrappers' ``run``/``run_return_lse``, `single_prefill_with_kv_cache`, `single_decode_with_kv_cache`). The
flash-attn entry points return natural-log LSEs: multiply those by ``log2(e)`` before merging them here.
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks
from pagoda.reference import cascade as _ref

__all__ = ["merge_state", "merge_state_in_place", "merge_states", "MultiLevelCascadeAttentionWrapper"]

_V_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_pair(v_name: str, v: torch.Tensor, s_name: str, s: torch.Tensor) -> None:
    _checks.check_tensor(v_name, v, ndim=3, dtypes=_V_DTYPES)
    _checks.check_tensor(s_name, s, ndim=2, dtypes=(torch.float32,))
    if tuple(s.shape) != tuple(v.shape[:2]):
        raise ValueError(f"{s_name} must have shape {tuple(v.shape[:2])} (seq_len, num_heads) to match "
                         f"{v_name}, got {tuple(s.shape)}")
    if s.device != v.device:
        raise ValueError(f"{s_name} must be on {v.device}, got {s.device}")


def _check_same(a_name, a, b_name, b):
    if a.shape != b.shape:
        raise ValueError(f"{b_name} must have the shape of {a_name} {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{b_name} must have the dtype of {a_name} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{b_name} must be on {a.device}, got {b.device}")


def _contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def merge_state(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor,
                s_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the attention states of two KV segments A and B of the same queries.

    Args:
        v_a, v_b: ``[seq_len, num_heads, head_dim]`` fp16/bf16/fp32 attention outputs.
        s_a, s_b: ``[seq_len, num_heads]`` float32 base-2 LSEs (``-inf`` = empty segment).
    Returns:
        ``(V [seq_len, num_heads, head_dim], S [seq_len, num_heads] float32 base 2)``: attention over [A; B].

    Example:
        >>> v, s = pagoda.merge_state(v_prefix, s_prefix, v_suffix, s_suffix)   # shared prefix + own suffix
    """
    _check_pair("v_a", v_a, "s_a", s_a)
    _check_pair("v_b", v_b, "s_b", s_b)
    _check_same("v_a", v_a, "v_b", v_b)
    if not v_a.is_cuda:
        return _ref.merge_state(v_a, s_a, v_b, s_b, base2=True)
    from pagoda.kernels.attention.merge import merge_state_fwd

    v_a, v_b = _contig(v_a), _contig(v_b)
    out = torch.empty_like(v_a)
    lse = torch.empty_like(s_a)
    merge_state_fwd(v_a, s_a, v_b, s_b, out, lse, base2=True)
    return out, lse


def merge_state_in_place(v: torch.Tensor, s: torch.Tensor, v_other: torch.Tensor, s_other: torch.Tensor,
                         mask: torch.Tensor | None = None) -> None:
    """Merge ``(v_other, s_other)`` into ``(v, s)`` in place.

    Args:
        v: ``[seq_len, num_heads, head_dim]`` (updated); s: ``[seq_len, num_heads]`` float32 base-2 LSE (updated).
        v_other, s_other: the state to fold in, same shapes.
        mask: optional bool ``[seq_len]``: rows where it is False are left as they are (CUDA-graph
            friendly way to merge only some requests).
    """
    _check_pair("v", v, "s", s)
    _check_pair("v_other", v_other, "s_other", s_other)
    _check_same("v", v, "v_other", v_other)
    if mask is not None:
        _checks.check_tensor("mask", mask, ndim=1, dtypes=(torch.bool,))
        if mask.shape[0] != v.shape[0] or mask.device != v.device:
            raise ValueError(f"mask must be a bool [{v.shape[0]}] tensor on {v.device}, "
                             f"got {tuple(mask.shape)} on {mask.device}")
    if not v.is_cuda:
        _ref.merge_state_in_place(v, s, v_other, s_other, mask, base2=True)
        return
    if v.stride(-1) != 1:
        raise ValueError("v must have a contiguous last dimension to be updated in place")
    from pagoda.kernels.attention.merge import merge_state_fwd

    merge_state_fwd(v, s, _contig(v_other), s_other, v, s, mask, base2=True)


def merge_states(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``num_states`` attention states per query (e.g. the splits of a long KV).

    Args:
        v: ``[seq_len, num_states, num_heads, head_dim]``; s: ``[seq_len, num_states, num_heads]`` float32 base-2 LSEs.
    Returns:
        ``(V [seq_len, num_heads, head_dim], S [seq_len, num_heads] float32 base 2)``; no states: zeros and ``-inf``.

    Example:
        >>> v, s = pagoda.merge_states(torch.stack([v_a, v_b, v_c], 1), torch.stack([s_a, s_b, s_c], 1))
    """
    _checks.check_tensor("v", v, ndim=4, dtypes=_V_DTYPES)
    _checks.check_tensor("s", s, ndim=3, dtypes=(torch.float32,))
    if tuple(s.shape) != tuple(v.shape[:3]):
        raise ValueError(f"s must have shape {tuple(v.shape[:3])} (seq_len, num_states, num_heads), "
                         f"got {tuple(s.shape)}")
    if s.device != v.device:
        raise ValueError(f"s must be on {v.device}, got {s.device}")
    if v.shape[1] == 0:  # no states to merge: an empty segment (zero output, LSE -inf)
        seq, _, heads, dim = v.shape
        return (torch.zeros(seq, heads, dim, dtype=v.dtype, device=v.device),
                torch.full((seq, heads), float("-inf"), dtype=torch.float32, device=v.device))
    if not v.is_cuda:
        return _ref.merge_states(v, s, base2=True)
    from pagoda.kernels.attention.merge import merge_states_fwd

    v = _contig(v)
    seq, _, heads, dim = v.shape
    out = torch.empty(seq, heads, dim, dtype=v.dtype, device=v.device)
    lse = torch.empty(seq, heads, dtype=torch.float32, device=v.device)
    merge_states_fwd(v, s, out, lse, base2=True)
    return out, lse


class MultiLevelCascadeAttentionWrapper:
    """Multi-level cascade attention over one paged KV cache (FlashInfer's wrapper, same API).

    Level 0 is KV shared by every query (e.g. a system prompt), middle levels are shared by subsets,
    the last level is each request's own KV. Each level runs once as a batch prefill over its
    (qo_indptr, paged KV) — so a shared prefix is read once for all the queries that share it — and
    the partial states are merged exactly through their LSEs (`merge_state_in_place`). As in FlashInfer,
    ``causal`` applies to the last level only (shared levels are entirely in every query's past).
    `pagoda.ops.cascade_levels.build_cascade_levels` builds the per-level metadata from page lists.
    """

    def __init__(self, num_levels: int, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf_arr: list[torch.Tensor] | None = None,
                 paged_kv_indptr_buf_arr: list[torch.Tensor] | None = None,
                 paged_kv_indices_buf_arr: list[torch.Tensor] | None = None,
                 paged_kv_last_page_len_buf_arr: list[torch.Tensor] | None = None):
        from pagoda.ops.prefill import BatchPrefillWithPagedKVCacheWrapper

        if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 1:
            raise ValueError(f"num_levels must be an int >= 1, got {num_levels!r}")
        if not isinstance(use_cuda_graph, bool):
            raise TypeError(f"use_cuda_graph must be a bool, got {type(use_cuda_graph).__name__}")
        self._num_levels = num_levels
        self._kv_layout = kv_layout
        self._use_cuda_graph = use_cuda_graph
        if use_cuda_graph:
            arrs = dict(qo_indptr_buf_arr=qo_indptr_buf_arr, paged_kv_indptr_buf_arr=paged_kv_indptr_buf_arr,
                        paged_kv_indices_buf_arr=paged_kv_indices_buf_arr,
                        paged_kv_last_page_len_buf_arr=paged_kv_last_page_len_buf_arr)
            for name, arr in arrs.items():
                if arr is None or len(arr) != num_levels:
                    raise ValueError(f"{name} must be a list of {num_levels} buffers when use_cuda_graph=True")
            self._wrappers = [
                BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout, use_cuda_graph=True,
                                                    qo_indptr_buf=a, paged_kv_indptr_buf=b, paged_kv_indices_buf=c,
                                                    paged_kv_last_page_len_buf=d)
                for a, b, c, d in zip(*arrs.values())]
        else:
            self._wrappers = [BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout)
                              for _ in range(num_levels)]
        # The last level holds only each request's own KV: a decode step whose new token's page is
        # shared (or an append into shared pages) leaves it with fewer keys than queries, legitimately.
        self._wrappers[-1]._short_kv_ok = True

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def plan(self, qo_indptr_arr: list[torch.Tensor], paged_kv_indptr_arr: list[torch.Tensor],
             paged_kv_indices_arr: list[torch.Tensor], paged_kv_last_page_len: list[torch.Tensor], num_qo_heads: int,
             num_kv_heads: int, head_dim: int, page_size: int, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale: float | None = None, window_left: int = -1,
             logits_soft_cap: float | None = None, rope_scale: float | None = None, rope_theta: float | None = None,
             q_data_type: str | torch.dtype = "float16", kv_data_type: str | torch.dtype | None = None) -> None:
        """Per-level lists (length ``num_levels``) of int32 ``qo_indptr``, ``paged_kv_indptr``,
        ``paged_kv_indices`` and ``paged_kv_last_page_len``; every ``qo_indptr[-1]`` is the total number
        of queries. Other arguments as `BatchPrefillWithPagedKVCacheWrapper.plan`."""
        arrs = (("qo_indptr_arr", qo_indptr_arr), ("paged_kv_indptr_arr", paged_kv_indptr_arr),
                ("paged_kv_indices_arr", paged_kv_indices_arr), ("paged_kv_last_page_len", paged_kv_last_page_len))
        for name, arr in arrs:
            if not isinstance(arr, (list, tuple)) or len(arr) != self._num_levels:
                raise ValueError(f"{name} must be a list of {self._num_levels} tensors (one per level)")
        for i, t in enumerate(qo_indptr_arr):
            _checks.check_tensor(f"qo_indptr_arr[{i}]", t, ndim=1, dtypes=(torch.int32,))
            if t.shape[0] < 1:
                raise ValueError(f"qo_indptr_arr[{i}] must have length batch_size + 1 >= 1, got 0")
        totals = [int(t[-1]) for t in qo_indptr_arr]
        if any(t != totals[0] for t in totals):
            raise ValueError(f"every level's qo_indptr must end at the same number of queries, got {totals}")
        self._nnz = totals[0]
        for i, (w, qo, kvp, kvi, last) in enumerate(zip(self._wrappers, *(a for _, a in arrs))):
            w.plan(qo, kvp, kvi, last, num_qo_heads, num_kv_heads, head_dim, page_size,
                   causal=causal if i == self._num_levels - 1 else False, pos_encoding_mode=pos_encoding_mode,
                   use_fp16_qk_reduction=use_fp16_qk_reduction, sm_scale=sm_scale, window_left=window_left,
                   logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
                   q_data_type=q_data_type, kv_data_type=kv_data_type)

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """q ``[total_queries, num_qo_heads, head_dim]`` -> out of the same shape (attention over every level)."""
        out, lse = self._wrappers[0].run(q, paged_kv_cache, return_lse=True)
        for w in self._wrappers[1:]:
            o, s = w.run(q, paged_kv_cache, return_lse=True)
            merge_state_in_place(out, lse, o, s)
        return out

    forward = run

    def end_forward(self) -> None:
        """Kept for compatibility; nothing to release."""

"""Workspace sizing and swapping for the FlashInfer-style wrappers: ``workspace_size`` and ``reset_workspace_buffer``.

pagoda's wrappers keep one caller-owned buffer, the float workspace: the float32 partial states of split-KV
(``rows * splits * num_qo_heads * (head_dim + 1) * 4`` bytes, `pagoda.ops._decode_plan.workspace_views`). A plan
chooses its split count from the lengths, the GPU and the buffer (a smaller buffer only lowers it), so
``workspace_size`` answers with the bytes of the split count a plan would choose with an unbounded buffer, for the
same arguments: planning with a buffer of exactly that size then chooses the same split (or fewer). Off CUDA nothing
is split and the answer is 0. pagoda keeps its int32 metadata in buffers of its own; FlashInfer's separate int
workspace is accepted and unused, and its size is reported as `INT_WORKSPACE_BYTES`, the smallest buffer
FlashInfer's API asks for (``> 0``).

Buffers must be 16-byte aligned (FlashInfer's ValueError wording), checked where FlashInfer checks them: the
constructors of the paged wrappers and every ``reset_workspace_buffer``.
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks, _multi_item, _paged
from pagoda.ops import _decode_plan as _plan
from pagoda.ops import _prefill_common as _common
from pagoda.ops import _prefill_split as _split

INT_WORKSPACE_BYTES = 16
ALIGNMENT = 16


def check_alignment(buffer, name: str, alignment: int = ALIGNMENT) -> None:
    """ValueError unless ``buffer`` (a tensor) starts on an ``alignment``-byte boundary (empty buffers pass)."""
    _checks.check_tensor(name, buffer)
    if buffer.numel() and buffer.data_ptr() % alignment:
        raise ValueError(f"{name} must be {alignment}-byte aligned, got data_ptr % {alignment} = "
                         f"{buffer.data_ptr() % alignment}")


def check_new_buffers(wrapper, float_workspace_buffer, int_workspace_buffer) -> None:
    """`reset_workspace_buffer`'s checks: both buffers aligned, the float one contiguous on the wrapper's device."""
    check_alignment(float_workspace_buffer, "float_workspace_buffer")
    if int_workspace_buffer is not None:
        check_alignment(int_workspace_buffer, "int_workspace_buffer")
    if float_workspace_buffer.device != wrapper.device or not float_workspace_buffer.is_contiguous():
        raise ValueError(f"float_workspace_buffer must be a contiguous tensor on {wrapper.device}")


def _bytes(rows: int, splits: int, num_qo_heads: int, head_dim: int) -> int:
    return rows * splits * num_qo_heads * (head_dim + 1) * 4 if splits else 0


def _host_lens(indptr, last_page_len, page_size: int) -> list:
    ptr, last = indptr.tolist(), last_page_len.tolist()
    return [(ptr[i + 1] - ptr[i] - 1) * page_size + last[i] if ptr[i + 1] > ptr[i] else 0
            for i in range(len(last))]


def prefill_float_bytes(wrapper, qo_lens: list, kv_lens: list, hq: int, hk: int, d: int, q_dtype, page_size: int,
                        fixed_split_size, disable_split_kv: bool) -> int:
    """Float workspace a paged-prefill plan of these lengths uses (`BatchPrefillWithPagedKVCacheWrapper._plan_split`
    with an unbounded buffer); rows = the plan's queries."""
    if not _paged.use_triton(wrapper._workspace) or disable_split_kv:
        return 0
    from pagoda.kernels.attention.prefill_paged import SPLIT_ALIGN, choose_block_m

    group, sms, rows = hq // hk, _plan.num_sms(wrapper.device), sum(qo_lens)
    bm = choose_block_m(max(max(qo_lens, default=0), 1) * group, d, q_dtype == torch.float32)
    n = _split.programs(qo_lens, group, hk, bm)
    if wrapper._use_cuda_graph:
        fixed = wrapper._graph_split
        splits = fixed[1] if fixed else _split.graph_splits(n or hk * max(len(qo_lens), 1), sms, bm)
    else:
        fixed = None if fixed_split_size is None else fixed_split_size * page_size
        splits = _split.choose(n, max(kv_lens, default=0), sms, _plan.MAX_SPLITS, bm, SPLIT_ALIGN, fixed)[1]
    return _bytes(rows, splits, hq, d)


class DecodeWorkspace:
    """`BatchDecodeWithPagedKVCacheWrapper.workspace_size` (FlashInfer 0.6's signature)."""

    def workspace_size(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor,
                       num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                       pos_encoding_mode: str = "NONE", window_left: int = -1, logits_soft_cap: float | None = None,
                       q_data_type: str | torch.dtype | None = "float16",
                       kv_data_type: str | torch.dtype | None = None, o_data_type: str | torch.dtype | None = None,
                       data_type: str | torch.dtype | None = None, sm_scale: float | None = None,
                       rope_scale: float | None = None, rope_theta: float | None = None,
                       block_tables: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
                       fixed_split_size: int | None = None, disable_split_kv: bool = False, q_len_per_req: int = 1
                       ) -> tuple[int, int]:
        """``(float_workspace_size, int_workspace_size)`` in bytes that `plan` with the same arguments needs
        (module docstring: `pagoda.ops._workspace`). Reads ``indptr``/``last_page_len`` on the host as plan does;
        allocates nothing and leaves the plan as it is."""
        from pagoda.ops import _decode_multi

        check_alignment(self._workspace, "float_workspace_buffer")
        hq, hk, d = _plan.check_heads(num_qo_heads, num_kv_heads, head_dim)
        page_size = _plan.as_int("page_size", page_size, 1)
        _plan.check_pos_encoding(pos_encoding_mode)
        _plan.check_window_left(window_left)
        n = _decode_multi.check_q_len(q_len_per_req, self._use_tensor_cores, "auto", getattr(self, "_graph_q_len",
                                                                                            None))
        q_dtype = _plan.canonical_dtype("q_data_type", q_data_type or data_type or "float16")
        if fixed_split_size is not None:
            fixed_split_size = _plan.as_int("fixed_split_size", fixed_split_size, 1)
        batch = _paged.check_kv_csr(indptr, indices, last_page_len, page_size, None, self.device,
                                    names=("indptr", "indices", "last_page_len"), host_ok=True)
        lens = [int(x) for x in seq_lens.tolist()] if seq_lens is not None else _host_lens(indptr, last_page_len,
                                                                                           page_size)
        if n > 1:
            if min(lens, default=n) < n:
                raise ValueError(f"q_len_per_req={n} requires kv_len >= q_len_per_req for every request")
            mp = getattr(self, "_multi_plan", None)
            inner = mp.wrapper if mp is not None and mp.wrapper._workspace is self._workspace else None
            probe = inner if inner is not None else _Probe(self)
            return (prefill_float_bytes(probe, [n] * batch, lens, hq, hk, d, q_dtype, page_size, fixed_split_size,
                                        disable_split_kv), INT_WORKSPACE_BYTES)
        sms = _plan.num_sms(self.device)
        if self._use_cuda_graph:
            grid = self._fixed_batch_size
            splits = self._graph_splits or (1 if disable_split_kv else _plan.graph_splits(grid, hk, sms,
                                                                                          _plan.MAX_SPLITS))
            return _bytes(grid, splits, hq, d), INT_WORKSPACE_BYTES
        splits = _plan.choose_chunk(max(lens, default=0), batch, hk, sms, page_size, fixed_split_size,
                                    disable_split_kv, _plan.MAX_SPLITS)[1]
        return _bytes(batch, splits, hq, d), INT_WORKSPACE_BYTES


class _Probe:
    """What `prefill_float_bytes` reads of a prefill wrapper, for a decode wrapper's multi-token rows before its inner
    prefill wrapper exists."""

    def __init__(self, decode_wrapper):
        self._workspace = decode_wrapper._workspace
        self.device = decode_wrapper.device
        self._use_cuda_graph = decode_wrapper._use_cuda_graph
        self._graph_split = None


class PrefillWorkspace:
    """`reset_workspace_buffer` of both prefill wrappers and the paged one's `workspace_size` (FlashInfer's)."""

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: torch.Tensor | None = None) -> None:
        """Swap the float workspace (the int workspace is checked and unused). The current plan stays valid: the
        split-KV partials are laid out at each `run` (a buffer too small for the planned split runs unsplit); a
        captured CUDA graph keeps the old buffer's address, so re-capture after a swap."""
        check_new_buffers(self, float_workspace_buffer, int_workspace_buffer)
        self._workspace = float_workspace_buffer

    def workspace_size(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor,
                       paged_kv_indices: torch.Tensor, paged_kv_last_page_len: torch.Tensor, num_qo_heads: int,
                       num_kv_heads: int, head_dim_qk: int, page_size: int, head_dim_vo: int | None = None,
                       custom_mask: torch.Tensor | None = None, packed_custom_mask: torch.Tensor | None = None,
                       causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                       sm_scale: float | None = None, window_left: int = -1, logits_soft_cap: float | None = None,
                       rope_scale: float | None = None, rope_theta: float | None = None,
                       q_data_type: str | torch.dtype = "float16", kv_data_type: str | torch.dtype | None = None,
                       o_data_type: str | torch.dtype | None = None, prefix_len_ptr: torch.Tensor | None = None,
                       token_pos_in_items_ptr: torch.Tensor | None = None, token_pos_in_items_len: int = 0,
                       max_item_len_ptr: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
                       seq_lens_q: torch.Tensor | None = None, block_tables: torch.Tensor | None = None,
                       max_token_per_sequence: int | None = None, max_sequence_kv: int | None = None,
                       fixed_split_size: int | None = None, disable_split_kv: bool = False) -> tuple[int, int]:
        """``(float_workspace_size, int_workspace_size)`` in bytes that `plan` with the same arguments needs
        (`pagoda.ops._workspace`). Reads the indptrs on the host as plan does; allocates nothing."""
        check_alignment(self._workspace, "float_workspace_buffer")
        _common.check_unsupported_plan_args(
            seq_lens=seq_lens, seq_lens_q=seq_lens_q, block_tables=block_tables,
            max_token_per_sequence=max_token_per_sequence, max_sequence_kv=max_sequence_kv)
        multi_item = _multi_item.check_plan(prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len,
                                            max_item_len_ptr, custom_mask, packed_custom_mask)
        hq, hk, d = _plan.check_heads(num_qo_heads, num_kv_heads, head_dim_qk)
        page_size = _plan.as_int("page_size", page_size, 1)
        _common.options(d, head_dim_vo, custom_mask, packed_custom_mask, False if multi_item else causal,
                        pos_encoding_mode, use_fp16_qk_reduction, window_left, logits_soft_cap, sm_scale, rope_scale,
                        rope_theta)
        q_dtype, _ = _common.dtypes(q_data_type, kv_data_type, o_data_type)
        if fixed_split_size is not None:
            fixed_split_size = _plan.as_int("fixed_split_size", fixed_split_size, 1)
        qptr = _common.check_indptr("qo_indptr", qo_indptr, self.device, host_ok=True)
        _paged.check_kv_csr(paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, page_size, None,
                            self.device, names=("paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len"),
                            batch_size=len(qptr) - 1, host_ok=True)
        qo_lens = [b - a for a, b in zip(qptr, qptr[1:], strict=False)]
        kv_lens = _host_lens(paged_kv_indptr, paged_kv_last_page_len, page_size)
        return (prefill_float_bytes(self, qo_lens, kv_lens, hq, hk, d, q_dtype, page_size, fixed_split_size,
                                    disable_split_kv), INT_WORKSPACE_BYTES)


class RaggedWorkspace:
    """`BatchPrefillWithRaggedKVCacheWrapper.reset_workspace_buffer` (FlashInfer's; the ragged path uses no
    workspace in pagoda: the buffer is only kept)."""

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: torch.Tensor | None = None) -> None:
        """Swap the float workspace (the int workspace is accepted and unused); the plan stays valid."""
        _checks.check_tensor("float_workspace_buffer", float_workspace_buffer)
        if float_workspace_buffer.device != self.device:
            raise ValueError(f"float_workspace_buffer must be on {self.device}, got {float_workspace_buffer.device}")
        self._workspace = float_workspace_buffer

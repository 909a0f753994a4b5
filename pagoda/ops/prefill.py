"""Prefill/append attention with FlashInfer's API (``flashinfer.prefill``).

* `BatchPrefillWithPagedKVCacheWrapper`: queries ragged by ``qo_indptr``, keys in a paged cache; the
  Triton kernel in `pagoda.kernels.attention.prefill_paged` on CUDA, with split-KV planned by
  `pagoda.ops._prefill_split` when the batch is too small to fill the GPU.
* `BatchPrefillWithRaggedKVCacheWrapper`: queries and keys both ragged; runs
  `pagoda.ops.attention.flash_attn_varlen_func` (RoPE, when asked, is applied to copies first).
* `single_prefill_with_kv_cache`: one request, through the paged kernel with a one-page table.

Causal masks align to the end of each request's keys (query ``i`` at position ``i + kv_len - qo_len``).
Semantics: `pagoda.reference.prefill`. Everything falls back to the reference off CUDA.
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks, _dispatch, _mask, _multi_item, _paged, _workspace
from pagoda.ops import _decode_plan as _plan
from pagoda.ops import _prefill_common as _common
from pagoda.ops import _prefill_split as _split
from pagoda.ops._prefill_ragged import BatchPrefillWithRaggedKVCacheWrapper, single_prefill_with_kv_cache
from pagoda.reference import decode as _dref
from pagoda.reference import prefill as _ref

__all__ = ["BatchPrefillWithPagedKVCacheWrapper", "BatchPrefillWithRaggedKVCacheWrapper",
           "single_prefill_with_kv_cache"]


class BatchPrefillWithPagedKVCacheWrapper(_workspace.PrefillWorkspace):
    """Prefill/append attention: ragged queries against a paged KV cache (FlashInfer's wrapper).

    Constructor as FlashInfer's; with ``use_cuda_graph=True`` the int32 buffers ``qo_indptr_buf``,
    ``paged_kv_indptr_buf`` ``[max_batch+1]``, ``paged_kv_indices_buf`` and
    ``paged_kv_last_page_len_buf`` ``[max_batch]`` are required, plan only writes into them (smaller
    batches are padded with empty requests) and `run`'s grid depends only on ``q.shape`` and the first
    plan. ``float_workspace_buffer`` holds the float32 partial states of split-KV
    (``rows * splits * num_qo_heads * (head_dim + 1) * 4`` bytes); a smaller one only limits splitting.

    Example:
        >>> w = pagoda.BatchPrefillWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"))
        >>> w.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, 32, 8, 128, 16, causal=True,
        ...        q_data_type=torch.bfloat16)
        >>> out = w.run(q, kv_cache)            # q [qo_indptr[-1], 32, 128] -> out of the same shape
    """

    # An engine's own CUDA-graph wrappers: page tables given in pinned host memory go up without waiting (their
    # owner keeps each step's table alive and unchanged until the copy runs). Off by default: FlashInfer's plan
    # waits for a host table's copy, so a caller may refill the table as soon as plan returns.
    _pinned_tables_async = False

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf: torch.Tensor | None = None, paged_kv_indptr_buf: torch.Tensor | None = None,
                 paged_kv_indices_buf: torch.Tensor | None = None,
                 paged_kv_last_page_len_buf: torch.Tensor | None = None, custom_mask_buf: torch.Tensor | None = None,
                 mask_indptr_buf: torch.Tensor | None = None, backend: str = "auto", jit_args: object | None = None):
        _common.check_constructor(float_workspace_buffer, kv_layout, use_cuda_graph, backend, jit_args,
                                  custom_mask_buf, mask_indptr_buf)
        _workspace.check_alignment(float_workspace_buffer, "float_workspace_buffer")
        self.device = float_workspace_buffer.device
        self._workspace = float_workspace_buffer
        # Keys per split, read by the kernel from device memory (a captured graph replays for new lengths).
        self._chunk_buf = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._graph_split = None    # (BLOCK_M, splits) fixed by a CUDA-graph wrapper's first plan
        self._short_kv_ok = False  # set by MultiLevelCascadeAttentionWrapper for its last level
        self._kv_layout = kv_layout
        self._use_cuda_graph = use_cuda_graph
        self._bufs = None
        if use_cuda_graph:
            bufs = dict(qo_indptr_buf=qo_indptr_buf, paged_kv_indptr_buf=paged_kv_indptr_buf,
                        paged_kv_indices_buf=paged_kv_indices_buf,
                        paged_kv_last_page_len_buf=paged_kv_last_page_len_buf)
            for name, buf in bufs.items():
                if buf is None:
                    raise ValueError(f"{name} is required when use_cuda_graph=True")
                _checks.check_tensor(name, buf, ndim=1, dtypes=(torch.int32,))
                if buf.device != self.device:
                    raise ValueError(f"{name} must be on {self.device}, got {buf.device}")
            n = paged_kv_last_page_len_buf.shape[0]
            if qo_indptr_buf.shape[0] != n + 1 or paged_kv_indptr_buf.shape[0] != n + 1:
                raise ValueError(f"qo_indptr_buf and paged_kv_indptr_buf must have length "
                                 f"len(paged_kv_last_page_len_buf) + 1 = {n + 1}")
            self._bufs = (qo_indptr_buf, paged_kv_indptr_buf, paged_kv_indices_buf, paged_kv_last_page_len_buf)
        self._alibi = None
        self._planned = False

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    @property
    def _plan_info(self) -> tuple | None:
        """FlashInfer's name for a wrapper's plan state (callers test it against None after `plan`): None until
        `plan` runs, else pagoda's plan: ``(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
        num_splits)``, the device tables the kernels read and the planned split-KV count."""
        return (*self._meta, self._splits) if self._planned else None

    def plan(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, paged_kv_indices: torch.Tensor,
             paged_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             page_size: int, head_dim_vo: int | None = None, custom_mask: torch.Tensor | None = None,
             packed_custom_mask: torch.Tensor | None = None, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale: float | None = None, window_left: int = -1,
             logits_soft_cap: float | None = None, rope_scale: float | None = None, rope_theta: float | None = None,
             q_data_type: str | torch.dtype = "float16", kv_data_type: str | torch.dtype | None = None,
             o_data_type: str | torch.dtype | None = None, non_blocking: bool = True,
             prefix_len_ptr: torch.Tensor | None = None, token_pos_in_items_ptr: torch.Tensor | None = None,
             token_pos_in_items_len: int = 0, max_item_len_ptr: torch.Tensor | None = None,
             seq_lens: torch.Tensor | None = None, seq_lens_q: torch.Tensor | None = None,
             block_tables: torch.Tensor | None = None, max_token_per_sequence: int | None = None,
             max_sequence_kv: int | None = None, fixed_split_size: int | None = None,
             disable_split_kv: bool = False) -> None:
        """Plan: int32 ``qo_indptr [batch+1]`` and the CSR page table (``paged_kv_indptr [batch+1]``,
        ``paged_kv_indices``, ``paged_kv_last_page_len [batch]``; each on the host or the device), head counts,
        head_dim, page_size and the options (causal, pos_encoding_mode NONE/ROPE_LLAMA/ALIBI, window_left,
        logits_soft_cap, sm_scale, rope_scale/rope_theta). With ``causal=True`` every request needs kv_len >= qo_len.
        Reads indptrs on the host.
        ``fixed_split_size`` (pages per split) or ``disable_split_kv`` override the split-KV heuristic (a
        CUDA-graph wrapper fixes its split count at the first plan).

        ``custom_mask`` (bool, each request's ``[qo_len, kv_len]`` mask flattened and concatenated: True = visible)
        or ``packed_custom_mask`` (uint8, the same bits packed little-endian per request by `segment_packbits`;
        wins over custom_mask) replaces ``causal`` (ignored, as in FlashInfer) and combines with ``window_left``.
        The masked Triton kernel reads one bit per score and skips key tiles the mask hides entirely
        (`pagoda.ops._mask`); not with ``use_cuda_graph=True`` (NotImplementedError)."""
        _common.check_unsupported_plan_args(
            seq_lens=seq_lens, seq_lens_q=seq_lens_q, block_tables=block_tables,
            max_token_per_sequence=max_token_per_sequence, max_sequence_kv=max_sequence_kv)
        multi_item = _multi_item.check_plan(prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len,
                                            max_item_len_ptr, custom_mask, packed_custom_mask)
        hq, hk, d = _plan.check_heads(num_qo_heads, num_kv_heads, head_dim_qk)
        page_size = _plan.as_int("page_size", page_size, 1)
        # (multi-item scoring: its mask holds the causality, as FlashInfer's kernel applies it whatever causal says)
        opts = _common.options(d, head_dim_vo, custom_mask, packed_custom_mask, False if multi_item else causal,
                               pos_encoding_mode, use_fp16_qk_reduction, window_left, logits_soft_cap, sm_scale,
                               rope_scale, rope_theta)
        q_dtype, kv_dtype = _common.dtypes(q_data_type, kv_data_type, o_data_type)
        if fixed_split_size is not None:
            fixed_split_size = _plan.as_int("fixed_split_size", fixed_split_size, 1)
        if not isinstance(disable_split_kv, bool):
            raise TypeError(f"disable_split_kv must be a bool, got {type(disable_split_kv).__name__}")
        # Each table may lie on the host or on the device (FlashInfer's plan copies it either way).
        qptr = _common.check_indptr("qo_indptr", qo_indptr, self.device, host_ok=True)
        batch = _paged.check_kv_csr(paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, page_size, None,
                                    self.device, names=("paged_kv_indptr", "paged_kv_indices",
                                                        "paged_kv_last_page_len"),
                                    batch_size=len(qptr) - 1, host_ok=True)
        kptr, last = paged_kv_indptr.tolist(), paged_kv_last_page_len.tolist()
        kv_lens = [(kptr[i + 1] - kptr[i] - 1) * page_size + last[i] if kptr[i + 1] > kptr[i] else 0
                   for i in range(batch)]
        for i in range(batch):
            # Causal alignment puts the queries at the end of the keys; without a causal mask (e.g. a
            # shared-prefix cascade level) any number of queries may attend to any number of keys. A
            # cascade's last level may also hold fewer keys than queries (the rest are in shared levels).
            if opts["causal"] and not self._short_kv_ok and qptr[i + 1] - qptr[i] > kv_lens[i]:
                raise ValueError(f"request {i} has {qptr[i + 1] - qptr[i]} queries but only {kv_lens[i]} keys: "
                                 "append the new tokens to the cache before prefill (kv_len >= qo_len)")
        # A custom mask (FlashInfer's layouts) becomes the masked kernel's bit words and tile lists here.
        qo_lens = [b - a for a, b in zip(qptr, qptr[1:], strict=False)]
        if multi_item:
            for name, t in zip(_multi_item.NAMES, (prefix_len_ptr, token_pos_in_items_ptr, None, max_item_len_ptr),
                               strict=True):
                if isinstance(t, torch.Tensor):
                    _paged.check_plan_device(name, t, self.device)
            custom_mask = _multi_item.dense_mask(prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len,
                                                 max_item_len_ptr, qo_lens, kv_lens)
        gluon = (custom_mask is not None or packed_custom_mask is not None) and _dispatch.masked_gluon_planned(
            q_dtype, d, page_size, max(qo_lens, default=0), self.device, opts["logits_soft_cap"],
            opts["pos_encoding_mode"])
        self._mask = _mask.plan_for_wrapper(custom_mask, packed_custom_mask, qo_lens, kv_lens, hq // hk, d, q_dtype,
                                            opts["window_left"], self.device, self._use_cuda_graph, gluon)
        used = paged_kv_indices[:kptr[-1]]
        self._max_page_id = int(used.max()) if used.numel() else -1
        if self._use_cuda_graph:
            # A captured graph keeps the launch's scalars: only the tables and lengths may change.
            key = (hq, hk, d, page_size, q_dtype, kv_dtype, tuple(sorted(opts.items())))
            if getattr(self, "_graph_key", key) != key:
                raise ValueError("a CUDA-graph wrapper re-plans only qo_indptr and the page table; heads, head_dim, "
                                 f"page_size, dtypes and options must equal the first plan's {self._graph_key}")
            self._graph_key = key
            qb, kb, ib, lb = self._bufs
            if batch > lb.shape[0] or kptr[-1] > ib.shape[0]:
                raise ValueError(f"batch {batch} / {kptr[-1]} pages exceed the CUDA-graph buffers "
                                 f"({lb.shape[0]} requests, {ib.shape[0]} pages)")
            qb[:batch + 1].copy_(qo_indptr, non_blocking=non_blocking)
            qb[batch + 1:].fill_(qptr[-1])
            kb[:batch + 1].copy_(paged_kv_indptr, non_blocking=non_blocking)
            kb[batch + 1:].fill_(kptr[-1])
            lb[:batch].copy_(paged_kv_last_page_len, non_blocking=non_blocking)
            lb[batch:].fill_(0)
            # From the host blocking, as FlashInfer's (the caller may refill its table once plan returns),
            # unless the owner asked for pinned tables to go up without waiting (`_pinned_tables_async`).
            ib[:kptr[-1]].copy_(paged_kv_indices[:kptr[-1]], non_blocking=non_blocking and (
                paged_kv_indices.device == self.device
                or (self._pinned_tables_async and paged_kv_indices.is_pinned())))
            self._meta = self._bufs
        else:
            self._meta = tuple(t.to(self.device, non_blocking=non_blocking) for t in
                               (qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len))
        if opts["pos_encoding_mode"] == "ALIBI" and (self._alibi is None or self._alibi.shape[0] != hq):
            self._alibi = _dref.alibi_slopes(hq, device=self.device)
        self._host_meta = tuple(t.cpu() for t in (qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len))
        self._nnz, self._max_qo = qptr[-1], max(qo_lens, default=0)
        self._plan_split(qo_lens, max(kv_lens, default=0), hq, hk, d, page_size, q_dtype,
                         None if fixed_split_size is None else fixed_split_size * page_size, disable_split_kv)
        self._shape, self._q_dtype, self._kv_dtype, self._opts = (hq, hk, d, page_size), q_dtype, kv_dtype, opts
        self._planned = True

    begin_forward = plan

    def _plan_split(self, qo_lens, longest, hq, hk, d, page_size, q_dtype, fixed_chunk, disable) -> None:
        """Choose BLOCK_M and the split-KV chunking (`pagoda.ops._prefill_split`) for the kernel path."""
        self._block_m, self._splits = None, 0
        if not _paged.use_triton(self._workspace):
            return
        from pagoda.kernels.attention.prefill_paged import SPLIT_ALIGN, choose_block_m

        group, sms = hq // hk, _plan.num_sms(self.device)
        if self._use_cuda_graph:
            if self._graph_split is None:
                bm = choose_block_m(max(self._max_qo, 1) * group, d, q_dtype == torch.float32)
                # (an empty first plan, e.g. a capture with dummy lengths: assume one tile per request)
                n = _split.programs(qo_lens, group, hk, bm) or hk * max(len(qo_lens), 1)
                self._graph_split = (bm, 0 if disable else _split.graph_splits(n, sms, bm))
            self._block_m, self._splits = self._graph_split
            if self._splits:
                self._chunk_buf.fill_(_split.graph_chunk(longest, self._splits, SPLIT_ALIGN, fixed_chunk))
            return
        bm = choose_block_m(self._max_qo * group, d, q_dtype == torch.float32)
        self._block_m = bm
        if disable:
            return
        cap = _split.max_splits(self._workspace, self._nnz, hq, d)
        chunk, self._splits = _split.choose(_split.programs(qo_lens, group, hk, bm), longest, sms, cap, bm,
                                            SPLIT_ALIGN, fixed_chunk)
        if self._splits:
            self._chunk_buf.fill_(chunk)

    def run(self, q: torch.Tensor, paged_kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor], *args: object,
            q_scale: float | None = None, k_scale: float | None = None, v_scale: float | None = None,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None, return_lse: bool = False,
            enable_pdl: bool | None = None, window_left: int | None = None
           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``q [qo_indptr[-1], num_qo_heads, head_dim]`` against ``paged_kv_cache`` (5-D or (k, v) tuple, the
        planned layout). Returns ``out`` like q (rows past qo_indptr[-1] are zero), or ``(out, lse)`` with
        ``lse [nnz_qo, num_qo_heads]`` float32 **base 2** as FlashInfer's (``-inf`` for rows that see no key)."""
        if not self._planned:
            raise RuntimeError("call plan() before run()")
        lse_given = lse is not None
        if args:
            raise TypeError(f"run() takes no extra positional arguments, got {len(args)}")
        opts = dict(self._opts)
        if window_left is not None and window_left != opts["window_left"]:
            raise ValueError(f"window_left={window_left} differs from the planned {opts['window_left']}; re-plan")
        hq, hk, d, page_size = self._shape
        k_cache, v_cache, ps, heads, dim = _paged.check_paged_kv_cache(paged_kv_cache, self._kv_layout)
        if (ps, heads, dim) != (page_size, hk, d):
            raise ValueError(f"paged_kv_cache has page_size={ps}, num_kv_heads={heads}, head_dim={dim}; the plan "
                             f"has {page_size}, {hk}, {d}")
        if k_cache.dtype != self._kv_dtype or k_cache.device != self.device:
            raise TypeError(f"paged_kv_cache must be {self._kv_dtype} on {self.device}, got {k_cache.dtype} on "
                            f"{k_cache.device}")
        if k_cache.shape[0] <= self._max_page_id:
            raise ValueError(f"the page table refers to page {self._max_page_id} but paged_kv_cache has "
                             f"{k_cache.shape[0]} pages")
        _common.run_checks(q, hq, d, self._nnz, self._q_dtype, self.device, out, lse)
        qk_factor, v_scale = _plan.run_scales(q_scale, k_scale, v_scale)
        opts["sm_scale"] *= qk_factor
        if not _paged.use_triton(q):
            if self._mask is not None:
                o, o_lse = _mask.reference_paged(q, (k_cache, v_cache), self._host_meta, self._kv_layout, self._mask,
                                                 opts)
            else:
                o, o_lse = _ref.batch_prefill_with_paged_kv_cache(q, (k_cache, v_cache), *self._host_meta,
                                                                  self._kv_layout, **opts)
            out = o if out is None else out.copy_(o)
            lse = o_lse if lse is None else lse.copy_(o_lse)
            return _common.finish(out, lse, v_scale, return_lse, lse_given)
        from pagoda.ops._dispatch import prefill_paged

        q = q if q.stride(-1) == 1 else q.contiguous()
        # Rows past qo_indptr[-1] are never written by the kernel: they get zeros / -inf.
        padded = self._use_cuda_graph or q.shape[0] > self._nnz
        if out is None:
            out = (torch.zeros_like if padded else torch.empty_like)(q, memory_format=torch.contiguous_format)
        elif padded:
            out.zero_()
        write_lse = return_lse or lse is not None
        if lse is None:
            lse = torch.empty(q.shape[0], hq, dtype=torch.float32, device=q.device)
        if padded:
            lse.fill_(float("-inf"))
        # Graph mode: the grid may not depend on the plan, so size it by q (tiles past a request's end exit).
        max_qo = q.shape[0] if self._use_cuda_graph else self._max_qo
        rows, splits = (q.shape[0] if self._use_cuda_graph else self._nnz), self._splits
        if splits and _split.max_splits(self._workspace, rows, hq, d) < splits:
            splits = 0  # graph mode: the workspace cannot hold this q's partial states; never write past it
        o_part, lse_part = _plan.workspace_views(self._workspace, rows, splits, hq, d)
        mode = opts["pos_encoding_mode"]
        prefill_paged(q, k_cache, v_cache, _paged.cache_strides(k_cache, self._kv_layout),
                      _paged.cache_strides(v_cache, self._kv_layout), *self._meta, page_size, hk, max_qo, out, lse,
                      sm_scale=opts["sm_scale"], causal=opts["causal"], window_left=opts["window_left"],
                      logits_soft_cap=opts["logits_soft_cap"], alibi_slopes=self._alibi if mode == "ALIBI" else None,
                      alibi_signed=True,
                      rope=(opts["rope_scale"], opts["rope_theta"]) if mode == "ROPE_LLAMA" else None,
                      block_m=self._block_m, num_splits=splits, chunk=self._chunk_buf, o_part=o_part,
                      lse_part=lse_part, write_lse=write_lse, custom_mask=self._mask,
                      allow_gluon=getattr(self, "_gluon_ok", True))
        return _common.finish(out, lse, v_scale, return_lse, lse_given)

    def run_return_lse(self, q: torch.Tensor, paged_kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                       *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """`run` with ``return_lse=True``: ``(out, lse)``, lse base 2."""
        return self.run(q, paged_kv_cache, *args, **kwargs, return_lse=True)

    def forward(self, q: torch.Tensor, paged_kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                k_scale: float | None = None, v_scale: float | None = None, window_left: int = -1,
                logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale: float | None = None,
                rope_theta: float | None = None, *, _return_lse: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """FlashInfer's deprecated form of `run`: as in FlashInfer, the options given here replace the planned
        ones for this call (a CUDA-graph wrapper must keep its planned options)."""
        opts = _common.forward_options(self._shape[2], causal, pos_encoding_mode, use_fp16_qk_reduction, window_left,
                                       logits_soft_cap, sm_scale, rope_scale, rope_theta)
        planned, alibi = self._opts, self._alibi
        if self._use_cuda_graph and opts != planned:
            raise ValueError("forward() options differ from the plan's; a CUDA-graph wrapper keeps its planned "
                             "options (re-plan, or call run())")
        if opts["pos_encoding_mode"] == "ALIBI" and (alibi is None or alibi.shape[0] != self._shape[0]):
            self._alibi = _dref.alibi_slopes(self._shape[0], device=self.device)
        self._opts = opts
        try:
            return self.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale, return_lse=_return_lse)
        finally:
            self._opts, self._alibi = planned, alibi

    def forward_return_lse(self, q: torch.Tensor, paged_kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                           causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                           k_scale: float | None = None, v_scale: float | None = None, window_left: int = -1,
                           logits_soft_cap: float | None = None, sm_scale: float | None = None,
                           rope_scale: float | None = None, rope_theta: float | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` returning ``(out, lse)`` (lse base 2), FlashInfer's deprecated ``forward_return_lse``."""
        return self.forward(q, paged_kv_cache, causal, pos_encoding_mode, use_fp16_qk_reduction, k_scale, v_scale,
                            window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, _return_lse=True)

    def end_forward(self) -> None:
        """Kept for compatibility; nothing to release."""

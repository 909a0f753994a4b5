"""Decode attention over a paged KV cache with FlashInfer's API (``flashinfer.decode``).

`BatchDecodeWithPagedKVCacheWrapper` plans once per batch (page table, split-KV decision; may sync)
and runs once per layer (no host sync; CUDA-graph capturable with ``use_cuda_graph=True``).
On CUDA the Triton split-KV kernel in `pagoda.kernels.attention.decode` runs; elsewhere the reference.
Semantics: `pagoda.reference.decode`.
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks, _decode_multi, _lse, _paged, _workspace
from pagoda.ops import _decode_plan as _plan
from pagoda.reference import decode as _ref

__all__ = ["BatchDecodeWithPagedKVCacheWrapper", "single_decode_with_kv_cache"]


def _launch(q, k_cache, v_cache, kv_layout, indptr, indices, last, page_size, hk, out, lse, chunk_buf, splits,
            o_part, lse_part, opts, counters=None):
    from pagoda.kernels.attention.decode import decode_fwd

    decode_fwd(q, k_cache, v_cache, _paged.cache_strides(k_cache, kv_layout), _paged.cache_strides(v_cache, kv_layout),
               indptr, indices, last, page_size, hk, out, lse, chunk=chunk_buf, num_splits=splits, o_part=o_part,
               lse_part=lse_part, counters=counters, **opts)


_KERNEL_MODULES: tuple = ()   # the kernel modules, set at the first CUDA call and kept for the process


def _kernel_modules():
    """(pagoda.kernels.launch.fast, pagoda.kernels.attention.decode), imported on first use (they import triton)
    and then kept: a function-level import costs ~1 µs per call on the per-layer path."""
    global _KERNEL_MODULES
    if not _KERNEL_MODULES:
        from pagoda.kernels.attention import decode as kdecode
        from pagoda.kernels.launch import fast
        _KERNEL_MODULES = (fast, kdecode)
    return _KERNEL_MODULES


def _kernel_opts(slopes, mode, sm_scale, window_left, soft_cap, rope_scale, rope_theta) -> dict:
    return dict(sm_scale=sm_scale, window_left=window_left, logits_soft_cap=soft_cap,
                alibi_slopes=slopes if mode == "ALIBI" else None,
                rope=(rope_scale, rope_theta) if mode == "ROPE_LLAMA" else None)


class BatchDecodeWithPagedKVCacheWrapper(_workspace.DecodeWorkspace):
    """Batch decode (one query token per request) over a paged KV cache, FlashInfer's wrapper.

    Args:
        float_workspace_buffer: any contiguous tensor (e.g. uint8, 128 MB) on the device; holds the
            float32 partial results of split-KV. A smaller buffer only limits the number of splits.
        kv_layout: ``"NHD"`` or ``"HND"``.
        use_cuda_graph: plan writes only into the given buffers and `run` can be captured once and
            replayed after re-planning for any batch of at most ``len(paged_kv_last_page_len_buffer)``
            requests (missing ones are planned as empty) whose pages fit the indices buffer; heads,
            page_size, dtypes and options stay those of the first plan (a re-plan that changes them raises).
        use_tensor_cores: accepted for compatibility (the kernel always uses ``tl.dot``).
        paged_kv_indptr_buffer / paged_kv_indices_buffer / paged_kv_last_page_len_buffer: int32 device
            buffers ``[max_batch + 1]`` / ``[max_pages]`` / ``[max_batch]``, required with use_cuda_graph.
        backend: ``"auto"`` or any FlashInfer backend name (pagoda's kernel runs for each); jit_args: must be None.

    Example:
        >>> w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"))
        >>> w.plan(kv_indptr, kv_indices, kv_last_page_len, 32, 8, 128, 16, q_data_type=torch.bfloat16)
        >>> for layer in range(num_layers):                  # plan once per batch, run per layer
        ...     out = w.run(q[layer], kv_cache[layer])         # [batch, 32, 128]
    """

    # An engine's own CUDA-graph wrappers: page tables given in pinned host memory go up without waiting (their
    # owner keeps each step's table alive and unchanged until the copy runs). Off by default: FlashInfer's plan
    # waits for a host table's copy, so a caller may refill the table as soon as plan returns.
    _pinned_tables_async = False

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 use_tensor_cores: bool = False, paged_kv_indptr_buffer: torch.Tensor | None = None,
                 paged_kv_indices_buffer: torch.Tensor | None = None,
                 paged_kv_last_page_len_buffer: torch.Tensor | None = None, backend: str = "auto",
                 jit_args: object | None = None):
        _workspace.check_alignment(float_workspace_buffer, "float_workspace_buffer")
        if not float_workspace_buffer.is_contiguous():
            raise ValueError("float_workspace_buffer must be contiguous")
        _paged.check_kv_layout(kv_layout)
        for name, flag in (("use_cuda_graph", use_cuda_graph), ("use_tensor_cores", use_tensor_cores)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        from pagoda.ops._prefill_common import check_backend

        check_backend(backend)   # FlashInfer's backend names: pagoda's decode kernel serves each
        if jit_args is not None:
            raise NotImplementedError("jit_args (custom attention variants) are not supported")
        self.device = float_workspace_buffer.device
        self._workspace = float_workspace_buffer
        self._kv_layout = kv_layout
        self._use_cuda_graph = use_cuda_graph
        self._use_tensor_cores = use_tensor_cores
        self._backend = backend   # FlashInfer's fa3 backend has no multi-token decode: plan() says so
        self._fixed_batch_size = 0
        if use_cuda_graph:
            bufs = (("paged_kv_indptr_buffer", paged_kv_indptr_buffer),
                    ("paged_kv_indices_buffer", paged_kv_indices_buffer),
                    ("paged_kv_last_page_len_buffer", paged_kv_last_page_len_buffer))
            for name, buf in bufs:
                if buf is None:
                    raise ValueError(f"{name} is required when use_cuda_graph=True")
                _checks.check_tensor(name, buf, ndim=1, dtypes=(torch.int32,))
                if buf.device != self.device:
                    raise ValueError(f"{name} must be on {self.device}, got {buf.device}")
            self._fixed_batch_size = paged_kv_last_page_len_buffer.shape[0]
            if paged_kv_indptr_buffer.shape[0] != self._fixed_batch_size + 1:
                raise ValueError("paged_kv_indptr_buffer must have length len(paged_kv_last_page_len_buffer) + 1 "
                                 f"= {self._fixed_batch_size + 1}, got {paged_kv_indptr_buffer.shape[0]}")
        self._indptr_buf = paged_kv_indptr_buffer
        self._indices_buf = paged_kv_indices_buffer
        self._last_buf = paged_kv_last_page_len_buffer
        # Keys per split, read by the kernels from device memory (so a graph replays for new lengths).
        self._chunk_buf = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._counters = None
        self._graph_splits = None
        self._alibi = None
        self._bound = {}      # recorded launches of `run`, per argument layout (emptied by every plan)
        self._planned = False

    @property
    def use_tensor_cores(self) -> bool:
        return self._use_tensor_cores

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    @property
    def _plan_info(self) -> object | None:
        """FlashInfer's name for a wrapper's plan state (callers test it against None after `plan`): None until
        `plan` runs, and again after `reset_workspace_buffer` (which voids a decode plan here); else pagoda's
        plan: the multi-token sub-plan (``q_len_per_req > 1``), or ``(indptr, indices, last_page_len,
        num_splits)``, the device page table the kernel reads and the planned split-KV count."""
        if not self._planned:
            return None
        return self._multi if self._multi is not None else (self._indptr, self._indices, self._last, self._splits)

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: torch.Tensor | None = None) -> None:
        """Swap the float workspace (both buffers 16-byte aligned; the int workspace is unused); re-plan afterwards.
        `workspace_size` gives the bytes a plan needs."""
        _workspace.check_new_buffers(self, float_workspace_buffer, int_workspace_buffer)
        self._workspace = float_workspace_buffer
        self._planned = False

    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor, num_qo_heads: int,
             num_kv_heads: int, head_dim: int, page_size: int, pos_encoding_mode: str = "NONE", window_left: int = -1,
             logits_soft_cap: float | None = None, q_data_type: str | torch.dtype = "float16",
             kv_data_type: str | torch.dtype | None = None, o_data_type: str | torch.dtype | None = None,
             data_type: str | torch.dtype | None = None, sm_scale: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, non_blocking: bool = True, block_tables: torch.Tensor | None = None,
             seq_lens: torch.Tensor | None = None, fixed_split_size: int | None = None, disable_split_kv: bool = False,
             q_len_per_req: int = 1) -> None:
        """Plan a batch: page table (int32 ``indptr [batch+1]``, ``indices [>= indptr[-1]]``,
        ``last_page_len [batch]``, on the host or the device), head counts, head_dim, page_size and
        the attention options (``pos_encoding_mode`` NONE/ROPE_LLAMA/ALIBI, ``window_left``,
        ``logits_soft_cap``, ``sm_scale`` default ``head_dim**-0.5``, ``rope_scale`` 1, ``rope_theta`` 1e4).
        ``q_data_type``/``kv_data_type`` (``data_type`` sets both) are checked against `run`'s tensors.
        ``fixed_split_size`` (pages per split) or ``disable_split_kv`` override the split heuristic.
        ``q_len_per_req = n > 1`` (speculative verification; needs ``use_tensor_cores=True`` and every
        ``kv_len >= n``): `run` then takes ``q [batch * n, Hq, D]``, each request's ``n`` tokens being the last ``n``
        keys of its cache, causal among themselves (`pagoda.ops._decode_multi`; fixed with the CUDA graph).
        Reads the page table on the host; never call it inside a CUDA graph capture."""
        self._plan_impl(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                        pos_encoding_mode, window_left, logits_soft_cap, q_data_type, kv_data_type, o_data_type,
                        data_type, sm_scale, rope_scale, rope_theta, non_blocking, block_tables, seq_lens,
                        fixed_split_size, disable_split_kv, q_len_per_req)

    begin_forward = plan

    def _plan_impl(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                   pos_encoding_mode, window_left, logits_soft_cap, q_data_type, kv_data_type, o_data_type, data_type,
                   sm_scale, rope_scale, rope_theta, non_blocking, block_tables, seq_lens, fixed_split_size,
                   disable_split_kv, q_len_per_req, fast: bool = False, indptr_host: torch.Tensor | None = None
                   ) -> None:
        """`plan`'s body. ``fast`` (`pagoda.ops.decode_graph.fast_decode_plan`): no value checks of the page table,
        only ``indptr`` read on the host (``indptr_host`` when given), lengths bounded by whole pages, and a
        CUDA-graph wrapper's buffers taken as already written by the caller."""
        hq, hk, d = _plan.check_heads(num_qo_heads, num_kv_heads, head_dim)
        page_size = _plan.as_int("page_size", page_size, 1)
        mode = _plan.check_pos_encoding(pos_encoding_mode)
        window_left = _plan.check_window_left(window_left)
        soft_cap = _plan.optional_positive("logits_soft_cap", logits_soft_cap, 0.0, allow_zero=True)
        scale = _plan.optional_positive("sm_scale", sm_scale, d ** -0.5)
        rope_scale = _plan.optional_positive("rope_scale", rope_scale, 1.0)
        rope_theta = _plan.optional_positive("rope_theta", rope_theta, 1e4)
        if data_type is not None:
            q_data_type = data_type if q_data_type in (None, "float16") else q_data_type
            kv_data_type = data_type if kv_data_type is None else kv_data_type
        q_dtype = _plan.canonical_dtype("q_data_type", q_data_type if q_data_type is not None else "float16")
        kv_dtype = _plan.canonical_dtype("kv_data_type", kv_data_type if kv_data_type is not None else q_dtype)
        o_dtype = _plan.canonical_dtype("o_data_type", o_data_type if o_data_type is not None else q_dtype)
        if o_dtype != q_dtype:
            raise NotImplementedError("o_data_type different from q_data_type is not supported")
        if block_tables is not None or seq_lens is not None:
            raise NotImplementedError("block_tables/seq_lens planning is not supported: pass the CSR page table "
                                      "(pagoda.ops.page.block_table_to_csr converts)")
        q_len_per_req = _decode_multi.check_q_len(q_len_per_req, self._use_tensor_cores,
                                                  self._backend,
                                                  getattr(self, "_graph_q_len", None))
        if fixed_split_size is not None:
            fixed_split_size = _plan.as_int("fixed_split_size", fixed_split_size, 1)
        if not isinstance(disable_split_kv, bool):
            raise TypeError(f"disable_split_kv must be a bool, got {type(disable_split_kv).__name__}")
        if fast:
            batch, ptr, lens = _plan.fast_tables(self, indptr, indices, last_page_len, page_size, indptr_host,
                                            q_len_per_req > 1)
            self._max_page_id = -1   # the page ids are not read (FlashInfer's fast plan checks none either)
        else:
            # Each table may lie on the host or on the wrapper's device, independently (FlashInfer's plan copies
            # it to the device, or into a CUDA-graph wrapper's buffers, wherever it lies).
            batch = _paged.check_kv_csr(indptr, indices, last_page_len, page_size, None, self.device,
                                        names=("indptr", "indices", "last_page_len"), host_ok=True)
            ptr = indptr.tolist()
            last_host = last_page_len.tolist()
            lens = [(ptr[i + 1] - ptr[i] - 1) * page_size + last_host[i] if ptr[i + 1] > ptr[i] else 0
                    for i in range(batch)]
            used = indices[:ptr[-1]]
            self._max_page_id = int(used.max()) if used.numel() else -1   # ids >= 0: checked by check_kv_csr
        self._multi = None
        if self._use_cuda_graph:
            self._graph_q_len = q_len_per_req
        if q_len_per_req > 1:   # speculative verification rows: the causal paged prefill (`pagoda.ops._decode_multi`)
            self._multi = _decode_multi.plan_multi(
                self, indptr, indices, last_page_len, lens, q_len_per_req, num_qo_heads=hq, num_kv_heads=hk,
                head_dim=d, page_size=page_size, pos_encoding_mode=mode, window_left=window_left,
                logits_soft_cap=soft_cap, sm_scale=scale, rope_scale=rope_scale, rope_theta=rope_theta,
                q_dtype=q_dtype, kv_dtype=kv_dtype, non_blocking=non_blocking, fixed_split_size=fixed_split_size,
                disable_split_kv=disable_split_kv)
            self._planned = True
            return

        sms = _plan.num_sms(self.device)
        graph_key = (hq, hk, d, page_size, q_dtype, kv_dtype, mode, scale, window_left, soft_cap, rope_scale,
                     rope_theta)
        if self._use_cuda_graph:
            grid_batch = self._fixed_batch_size
            if batch > grid_batch:
                raise ValueError(f"batch size {batch} exceeds the CUDA-graph buffers' batch size {grid_batch}")
            if ptr[-1] > self._indices_buf.shape[0]:
                raise ValueError(f"{ptr[-1]} pages exceed paged_kv_indices_buffer's length "
                                 f"{self._indices_buf.shape[0]}")
            if not fast:   # the fast plan's caller has written the buffers (FlashInfer's contract)
                self._indptr_buf[:batch + 1].copy_(indptr, non_blocking=non_blocking)
                self._indptr_buf[batch + 1:].fill_(ptr[-1])
                self._last_buf[:batch].copy_(last_page_len, non_blocking=non_blocking)
                self._last_buf[batch:].fill_(0)
                # From the host blocking, as FlashInfer's (the caller may refill its table once plan returns),
                # unless the owner asked for pinned tables to go up without waiting (`_pinned_tables_async`).
                self._indices_buf[:ptr[-1]].copy_(indices[:ptr[-1]], non_blocking=non_blocking and (
                    indices.device == self.device or (self._pinned_tables_async and indices.is_pinned())))
            if self._graph_splits is None:
                cap = _plan.max_splits_for(self._workspace, grid_batch, hq, d)
                if cap < 1:
                    raise ValueError(f"float_workspace_buffer is too small for CUDA-graph decode: it needs at least "
                                     f"{grid_batch * hq * (d + 1) * 4} bytes")
                self._graph_splits = 1 if disable_split_kv else _plan.graph_splits(grid_batch, hk, sms, cap)
                self._graph_key = graph_key
            elif self._graph_key != graph_key:
                # A captured graph keeps the launch's scalars and grid: only the page table may change.
                raise ValueError("a CUDA-graph wrapper re-plans only the page table and lengths; heads, head_dim, "
                                 "page_size, dtypes and attention options must equal the first plan's "
                                 f"{self._graph_key}, got {graph_key}")
            splits = self._graph_splits
            longest = max(lens, default=0)
            chunk = max(-(-longest // splits), 1)
            self._indptr, self._indices, self._last = self._indptr_buf, self._indices_buf, self._last_buf
        else:
            grid_batch = batch
            self._indptr = indptr.to(self.device, non_blocking=non_blocking)
            self._indices = indices.to(self.device, non_blocking=non_blocking)
            self._last = last_page_len.to(self.device, non_blocking=non_blocking)
            cap = _plan.max_splits_for(self._workspace, grid_batch, hq, d)
            chunk, splits = _plan.choose_chunk(max(lens, default=0), batch, hk, sms, page_size, fixed_split_size,
                                               disable_split_kv, cap)
        self._chunk_buf.fill_(chunk)
        # ALiBi slopes live as long as the wrapper's head count (a captured graph keeps their address).
        if mode == "ALIBI" and (self._alibi is None or self._alibi.shape[0] != hq):
            self._alibi = _ref.alibi_slopes(hq, device=self.device)
        self._splits = splits
        self._o_part, self._lse_part = _plan.workspace_views(self._workspace, grid_batch, splits, hq, d)
        # Split-KV merge tickets, one per (request, KV head); the kernel leaves them zero after each run. A
        # CUDA-graph wrapper sizes them once (a captured graph keeps their address).
        if splits and (self._counters is None or self._counters.numel() < grid_batch * hk):
            self._counters = torch.zeros(grid_batch * hk, dtype=torch.int32, device=self.device)
        self._batch, self._grid_batch = batch, grid_batch
        self._shape = (hq, hk, d, page_size)
        self._q_dtype, self._kv_dtype = q_dtype, kv_dtype
        self._opts = (mode, scale, window_left, soft_cap, rope_scale, rope_theta)
        self._host_meta = (indptr.cpu(), indices.cpu(), last_page_len.cpu()) if self.device.type != "cuda" else None
        self._bound = {}      # the launches' scalars, grid and buffers may all have changed
        self._planned = True

    def run(self, q: torch.Tensor, paged_kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor], *args: object,
            q_scale: float | None = None, k_scale: float | None = None, v_scale: float | None = None,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None, return_lse: bool = False,
            enable_pdl: bool | None = None, window_left: int | None = None
           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend ``q [batch, num_qo_heads, head_dim]`` (the planned q_data_type) to ``paged_kv_cache``
        (``[max_pages, 2, page_size, Hk, D]`` NHD / ``[max_pages, 2, Hk, page_size, D]`` HND, or a
        ``(k_cache, v_cache)`` tuple; the planned kv_data_type).

        Returns ``out [batch, num_qo_heads, head_dim]``, or ``(out, lse [batch, num_qo_heads])`` with
        ``return_lse`` (float32, base 2 as FlashInfer's; ``-inf`` and zero output for a request with no keys).
        ``out``/``lse`` may be passed preallocated. Does not sync with the host."""
        if not self._planned:
            raise RuntimeError("call plan() before run()")
        lse_given = lse is not None
        if args:
            raise TypeError(f"run() takes no extra positional arguments (custom kernels), got {len(args)}")
        if self._multi is not None:
            return self._multi.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, out=out,
                                   lse=lse, return_lse=return_lse, window_left=window_left)
        mode, scale, planned_window, soft_cap, rope_scale, rope_theta = self._opts
        if window_left is not None and window_left != planned_window:
            raise ValueError(f"window_left={window_left} differs from the planned {planned_window}; re-plan")
        hq, hk, d, page_size = self._shape
        k_cache, v_cache, ps, heads, dim = _paged.check_paged_kv_cache(paged_kv_cache, self._kv_layout)
        if (ps, heads, dim) != (page_size, hk, d):
            raise ValueError(f"paged_kv_cache has page_size={ps}, num_kv_heads={heads}, head_dim={dim}; "
                             f"the plan has {page_size}, {hk}, {d}")
        if k_cache.shape[0] <= self._max_page_id:
            raise ValueError(f"the page table refers to page {self._max_page_id} but paged_kv_cache has "
                             f"{k_cache.shape[0]} pages")
        _checks.check_tensor("q", q, ndim=3)
        if q.shape[0] not in (self._batch, self._grid_batch) or tuple(q.shape[1:]) != (hq, d):
            raise ValueError(f"q must have shape [{self._batch}, {hq}, {d}] (planned batch, num_qo_heads, "
                             f"head_dim), got {tuple(q.shape)}; several rows per request need "
                             "plan(..., q_len_per_req=n)")
        if q.dtype != self._q_dtype or k_cache.dtype != self._kv_dtype:
            raise TypeError(f"q/paged_kv_cache dtypes ({q.dtype}, {k_cache.dtype}) differ from the planned "
                            f"q_data_type/kv_data_type ({self._q_dtype}, {self._kv_dtype})")
        if q.device != self.device or k_cache.device != self.device:
            raise ValueError(f"q and paged_kv_cache must be on the workspace's device {self.device}")
        if q_scale is not None or k_scale is not None or v_scale is not None:
            qk_factor, v_scale = _plan.run_scales(q_scale, k_scale, v_scale)
            scale = scale * qk_factor
        b = q.shape[0]
        if out is not None:
            _checks.check_tensor("out", out, ndim=3, dtypes=(q.dtype,))
            if out.shape != q.shape or out.device != q.device or out.stride(-1) != 1:
                raise ValueError(f"out must be a [{b}, {hq}, {d}] tensor on {q.device} (last dim contiguous)")
        if lse is not None:
            _checks.check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,))
            if tuple(lse.shape) != (b, hq) or lse.device != q.device:
                raise ValueError(f"lse must be a float32 [{b}, {hq}] tensor on {q.device}")
        if not _paged.use_triton(q):
            o, o_lse = _ref.batch_decode_with_paged_kv_cache(
                q[:self._batch], (k_cache, v_cache), self._host_meta[0], self._host_meta[1], self._host_meta[2],
                self._kv_layout, sm_scale=scale, window_left=planned_window, logits_soft_cap=soft_cap,
                pos_encoding_mode=mode, rope_scale=rope_scale, rope_theta=rope_theta)
            o = torch.cat([o, torch.zeros_like(q[self._batch:])])
            o_lse = torch.cat([o_lse, torch.full((b - self._batch, hq), float("-inf"), device=q.device)])
            out = o if out is None else out.copy_(o)
            lse = o_lse if lse is None else lse.copy_(o_lse)
        else:
            q = q if q.stride(-1) == 1 else q.contiguous()
            out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
            lse = torch.empty(b, hq, dtype=torch.float32, device=q.device) if lse is None else lse
            self._launch_bound(q, k_cache, v_cache, out, lse, scale)
        if v_scale is not None:
            out.mul_(v_scale)
        if return_lse or lse_given:
            _lse.to_base2_(lse)   # the kernel writes natural log; FlashInfer's API is base 2
        return (out, lse) if return_lse else out

    forward = run

    def _launch_bound(self, q, k_cache, v_cache, out, lse, scale) -> None:
        """Launch the planned kernels; a repeat with the same strides, 16-byte alignments and scale replays
        the recorded launches with only q, the caches and out/lse swapped (no argument rebuild)."""
        _fast, _kdecode = _kernel_modules()
        key = (q.get_device(), q.shape[0], q.stride(0), q.stride(1), k_cache.stride(), v_cache.stride(), out.stride(),
               lse.stride(),
               q.data_ptr() & 15, k_cache.data_ptr() & 15, v_cache.data_ptr() & 15, out.data_ptr() & 15,
               lse.data_ptr() & 15, scale)
        mode, _, planned_window, soft_cap, rope_scale, rope_theta = self._opts
        hk, page_size = self._shape[1], self._shape[3]

        def launch_fn():
            _launch(q, k_cache, v_cache, self._kv_layout, self._indptr, self._indices, self._last, page_size, hk,
                    out, lse, self._chunk_buf, self._splits, self._o_part, self._lse_part,
                    _kernel_opts(self._alibi, mode, scale, planned_window, soft_cap, rope_scale, rope_theta),
                    self._counters)

        fused = _kdecode.merge_is_fused(self._splits, self._counters is not None)
        _fast.replay_or_record(self._bound, key, (q, k_cache, v_cache, out, lse), launch_fn,
                               1 + (self._splits > 0 and not fused))

    def run_return_lse(self, q: torch.Tensor, paged_kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                       *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """`run` with ``return_lse=True``."""
        return self.run(q, paged_kv_cache, *args, **kwargs, return_lse=True)

    def end_forward(self) -> None:
        """Kept for compatibility; nothing to release."""


def single_decode_with_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layout: str = "NHD",
                                pos_encoding_mode: str = "NONE", use_tensor_cores: bool = False,
                                q_scale: float | None = None, k_scale: float | None = None,
                                v_scale: float | None = None, window_left: int = -1,
                                logits_soft_cap: float | None = None, sm_scale: float | None = None,
                                rope_scale: float | None = None, rope_theta: float | None = None,
                                return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode one request: q ``[num_qo_heads, head_dim]``; k, v ``[kv_len, num_kv_heads, head_dim]`` (NHD) or
    ``[num_kv_heads, kv_len, head_dim]`` (HND); fp16/bf16 (fp32 too), all the same dtype.

    Returns ``out [num_qo_heads, head_dim]``, or ``(out, lse [num_qo_heads] float32 base 2)`` with return_lse.
    Options as in `BatchDecodeWithPagedKVCacheWrapper.plan`. Splits the keys across programs (no sync).
    """
    _checks.check_tensor("q", q, ndim=2)
    _checks.check_tensor("k", k, ndim=3)
    _checks.check_tensor("v", v, ndim=3)
    _paged.check_kv_layout(kv_layout)
    _checks.check_same("q, k, v", (q, k, v), "device")
    _checks.check_same("q, k, v", (q, k, v), "dtype")
    _checks.check_tensor("q", q, dtypes=_paged.CACHE_DTYPES)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    kv_len, hk = (k.shape[0], k.shape[1]) if kv_layout == "NHD" else (k.shape[1], k.shape[0])
    hq, _, d = _plan.check_heads(q.shape[0], hk, q.shape[1])
    if k.shape[2] != d:
        raise ValueError(f"k/v head_dim ({k.shape[2]}) must equal q's ({d})")
    mode = _plan.check_pos_encoding(pos_encoding_mode)
    window_left = _plan.check_window_left(window_left)
    soft_cap = _plan.optional_positive("logits_soft_cap", logits_soft_cap, 0.0, allow_zero=True)
    scale = _plan.optional_positive("sm_scale", sm_scale, d ** -0.5)
    scale *= _plan.optional_positive("q_scale", q_scale, 1.0) * _plan.optional_positive("k_scale", k_scale, 1.0)
    rope_scale = _plan.optional_positive("rope_scale", rope_scale, 1.0)
    rope_theta = _plan.optional_positive("rope_theta", rope_theta, 1e4)
    if not _paged.use_triton(q) or kv_len == 0:
        out, lse = _ref.single_decode_with_kv_cache(q, k, v, kv_layout, mode, window_left=window_left,
                                                    logits_soft_cap=soft_cap, sm_scale=scale, rope_scale=rope_scale,
                                                    rope_theta=rope_theta, return_lse=True)
    else:
        # The whole sequence is one page of kv_len tokens: the paged kernel with a trivial page table.
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        dev = q.device
        indptr = torch.arange(2, dtype=torch.int32, device=dev)
        indices = torch.zeros(1, dtype=torch.int32, device=dev)
        last = torch.full((1,), kv_len, dtype=torch.int32, device=dev)
        chunk, splits = _plan.choose_chunk(kv_len, 1, hk, _plan.num_sms(dev), kv_len, None, False, _plan.MAX_SPLITS)
        chunk_buf = torch.full((1,), chunk, dtype=torch.int32, device=dev)
        ws = torch.empty(max(splits, 1) * hq * (d + 1), dtype=torch.float32, device=dev)
        o_part, lse_part = _plan.workspace_views(ws, 1, splits, hq, d)
        out = torch.empty(1, hq, d, dtype=q.dtype, device=dev)
        lse = torch.empty(1, hq, dtype=torch.float32, device=dev)
        _launch(q[None], k[None], v[None], kv_layout, indptr, indices, last, kv_len, hk, out, lse, chunk_buf, splits,
                o_part, lse_part, _kernel_opts(_ref.alibi_slopes(hq, device=dev) if mode == "ALIBI" else None, mode,
                                               scale, window_left, soft_cap, rope_scale, rope_theta))
        out, lse = out[0], lse[0]
    if v_scale is not None:
        out = out * _plan.optional_positive("v_scale", v_scale, 1.0)
    return (out, _lse.to_base2_(lse)) if return_lse else out

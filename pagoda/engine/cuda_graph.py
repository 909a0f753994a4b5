"""CUDA graphs of the decode step: the model's forward pass captured once per batch size of a ladder.

A decode-only step of ``n`` requests replays the graph of the smallest captured size ``b >= n``; rows
``n .. b-1`` are padding (token 0 at position 0, batch index -1: the KV append skips them, and the
attention wrapper plans them as requests without pages). What changes between replays lives in static
device buffers that each step copies into before the replay:

- ``input_ids`` int64, ``positions`` and ``batch_indices`` int32 ``[max_batch]``;
- the CSR page table (``kv_indptr [max_batch + 1]``, ``kv_indices [max_pages]``, ``kv_last_page_len
  [max_batch]``), written by the plan of a `BatchDecodeWithPagedKVCacheWrapper` created with
  ``use_cuda_graph=True`` over views of these buffers (one wrapper per captured size, since the
  wrapper's grid is its buffers' batch size), and read by the KV append of every layer too.

The plan runs on the host before each replay, from host (pinned) copies of the page table: it reads
them without waiting for the device. All graphs share one memory pool and the float workspace of the
eager wrappers; they are captured from the largest size down so that the smaller ones reuse the larger
ones' intermediate memory. The graph covers the forward pass up to the last hidden state; the LM head,
the logits processors and the sampler run eagerly right after the replay (a few kernels).

Decode steps that cascade over shared prefix pages (`pagoda.engine.cascade`) replay a second graph of the
same size whose attention is a graph-mode `CascadeDecode` (its own page tables and row permutation in
`CascadeGraphBuffers`); the KV append still reads the step's whole page table from the buffers above.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence as SequenceABC

import torch

import pagoda
from pagoda.engine.cascade import CascadeDecode, CascadeGraphBuffers, CascadeGroups
from pagoda.models import ForwardContext, forward_context

logger = logging.getLogger(__name__)

# Largest batch captured by default (decode batches above it run eagerly).
MAX_CAPTURE_SIZE = 512
# Test hook: on a CPU, "capture" and "replay" run the same forward pass eagerly on the static buffers, so the
# CPU tests cover the graph path's buffers, padding and planning (everything but the CUDA graph itself).
EMULATE_ON_CPU = False


def graphs_available(device: torch.device) -> bool:
    """Whether decode graphs run on ``device``: CUDA, or a CPU under the `EMULATE_ON_CPU` test hook."""
    return device.type == "cuda" or EMULATE_ON_CPU


def capture_sizes(max_num_seqs: int, limit: int = MAX_CAPTURE_SIZE) -> list[int]:
    """The ladder of captured batch sizes: 1, 2, 4, 8, then every 8 up to ``min(max_num_seqs, limit)``
    (which is always included)."""
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 8))
    if top not in sizes:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    """The captured decode graphs of one model and KV cache.

    Args:
        model: the `DecoderForCausalLM` whose attention layers already hold their ``kv_cache``.
        workspace: the float workspace buffer shared with the eager wrappers.
        plan_args: ``(num_qo_heads, num_kv_heads, head_dim, page_size)``; plan_kwargs: the decode plan's
            keyword arguments (window_left, logits_soft_cap, sm_scale, q/kv data types).
        sizes: the batch sizes to capture; max_pages_per_seq: pages of the longest sequence.
    """

    def __init__(self, model, workspace: torch.Tensor, plan_args: tuple, plan_kwargs: dict, sizes: SequenceABC[int],
                 max_pages_per_seq: int, hidden_size: int, dtype: torch.dtype,
                 cascade_sizes: SequenceABC[int] = ()):
        if not sizes:
            raise ValueError("sizes must name at least one batch size to capture")
        self.model = model
        self.workspace = workspace
        self.device = workspace.device
        self.plan_args = plan_args
        self.plan_kwargs = dict(plan_kwargs)
        self.sizes = sorted(set(int(s) for s in sizes))
        self.max_batch = self.sizes[-1]
        dev = self.device
        mb = self.max_batch
        self.input_ids = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(mb, dtype=torch.int32, device=dev)
        self.batch_indices = torch.full((mb,), -1, dtype=torch.int32, device=dev)
        self.kv_indptr = torch.zeros(mb + 1, dtype=torch.int32, device=dev)
        self.kv_indices = torch.zeros(mb * max_pages_per_seq, dtype=torch.int32, device=dev)
        self.kv_last_page_len = torch.zeros(mb, dtype=torch.int32, device=dev)
        self.wrappers: dict[int, pagoda.BatchDecodeWithPagedKVCacheWrapper] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.hidden_size, self.dtype = hidden_size, dtype
        self.max_pages_per_seq = max_pages_per_seq
        # Two-level cascade decode steps (`pagoda.engine.cascade`) of these sizes replay graphs of their own.
        self.cascade_sizes = sorted(set(int(s) for s in cascade_sizes) & set(self.sizes))
        self.cascade_buffers = (CascadeGraphBuffers.allocate(mb, mb * max_pages_per_seq, dev)
                                if self.cascade_sizes else None)
        self.cascades: dict[int, CascadeDecode] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_outputs: dict[int, torch.Tensor] = {}
        self.cascade_kwargs = {k: v for k, v in self.plan_kwargs.items() if k != "window_left"}
        self.pool = None
        self.memory_bytes = 0          # device memory the capture took (graph pool and driver), measured
        self.capture_s = 0.0

    def size_for(self, n: int) -> int | None:
        """The captured size that serves a batch of ``n`` (None: larger than every captured size)."""
        for b in self.sizes:
            if b >= n:
                return b
        return None

    def has_cascade(self, n: int, groups: CascadeGroups) -> bool:
        """Whether a cascade step of ``n`` requests with ``groups`` replays a graph (a captured size, two levels,
        at most `pagoda.engine.cascade.GRAPH_GROUPS` groups sharing pages)."""
        b = self.size_for(n)
        return b in self.cascades and self.cascades[b].fits(groups)

    def _context(self, b: int, cascade: bool = False) -> ForwardContext:
        wrapper = self.cascades[b] if cascade else self.wrappers[b]
        return ForwardContext(wrapper=wrapper, batch_indices=self.batch_indices[:b],
                              positions=self.positions[:b], kv_indices=self.kv_indices,
                              kv_indptr=self.kv_indptr[:b + 1], kv_last_page_len=self.kv_last_page_len[:b],
                              validate=False)

    def _plan(self, b: int, indptr: torch.Tensor, indices: torch.Tensor, last: torch.Tensor) -> None:
        self.wrappers[b].plan(indptr, indices, last, *self.plan_args, **self.plan_kwargs)

    def _forward(self, b: int, cascade: bool = False) -> torch.Tensor:
        with forward_context(self._context(b, cascade)):
            return self.model(self.input_ids[:b], self.positions[:b])

    def _dummy_cascade(self, b: int) -> CascadeGroups:
        """The capture's groups: one group of all ``b`` rows sharing a long prefix (up to 256 distinct pages,
        read only: the shared level's kernel is compiled, and tuned where autotuning is on, for a long prefix
        streamed from memory as a served one is, not one page that stays in L2), each row's own page 0 after
        it."""
        page = self.plan_args[3]
        blocks = next(iter(self.model.attention_layers())).kv_cache.shape[0]
        shared = [i % blocks for i in range(max(min(self.max_pages_per_seq - 1, 256), 1))]
        return CascadeGroups(list(range(b)), [[(b, shared, page)], [(1, [0], 1)] * b], [(page * len(shared), b)])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one pool. Uses page 0 of the cache as the dummy
        requests' page (written by the warm-up runs only; no request holds pages yet)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            free_before = torch.cuda.mem_get_info(self.device)[0]
            self.pool = torch.cuda.graph_pool_handle()
        start = time.perf_counter()
        for b in self.sizes:
            self.wrappers[b] = pagoda.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True,
                paged_kv_indptr_buffer=self.kv_indptr[:b + 1], paged_kv_indices_buffer=self.kv_indices,
                paged_kv_last_page_len_buffer=self.kv_last_page_len[:b])
            self.wrappers[b]._pinned_tables_async = True      # each step's tables: fresh pinned arrays
        for b in reversed(self.sizes):
            indptr = torch.arange(b + 1, dtype=torch.int32)
            indices = torch.zeros(b, dtype=torch.int32)
            last = torch.ones(b, dtype=torch.int32)
            self._plan(b, indptr, indices, last)
            self.input_ids[:b].zero_()
            self.positions[:b].zero_()
            self.batch_indices[:b].copy_(torch.arange(b, dtype=torch.int32))
            if not cuda:     # EMULATE_ON_CPU: replay runs the forward pass itself
                self.outputs[b] = self._forward(b)
                continue
            # Warm-up on a side stream (compiles the kernels of this size), as capture requires.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(b)
            self.graphs[b], self.outputs[b] = graph, out
        for b in reversed(self.cascade_sizes):
            self.cascades[b] = CascadeDecode(self.workspace, "NHD", self.cascade_buffers.view(b))
            self.cascades[b].plan(self._dummy_cascade(b), self.plan_args, self.cascade_kwargs)
            self._plan(b, torch.arange(b + 1, dtype=torch.int32), torch.zeros(b, dtype=torch.int32),
                       torch.ones(b, dtype=torch.int32))
            self.input_ids[:b].zero_()
            self.positions[:b].zero_()
            self.batch_indices[:b].copy_(torch.arange(b, dtype=torch.int32))
            if not cuda:
                self.cascade_outputs[b] = self._forward(b, cascade=True)
                continue
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(b, cascade=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(b, cascade=True)
            self.cascade_graphs[b], self.cascade_outputs[b] = graph, out
        self.batch_indices.fill_(-1)
        if cuda:
            torch.cuda.synchronize(self.device)
            self.memory_bytes = max(free_before - torch.cuda.mem_get_info(self.device)[0], 0)
        self.capture_s = time.perf_counter() - start
        logger.info("captured %d decode CUDA graphs (batch %d..%d; %d of them cascade) in %.1f s, %.1f MiB",
                    len(self.sizes) + len(self.cascade_sizes), self.sizes[0], self.max_batch, len(self.cascade_sizes),
                    self.capture_s, self.memory_bytes / 2**20)

    def replay(self, n: int, host: dict, input_ids: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None,
               prev_tokens: torch.Tensor | None, cascade: CascadeGroups | None = None) -> torch.Tensor:
        """Run a decode step of ``n`` requests; returns the hidden states ``[n, hidden]`` (graph output:
        valid until the next replay).

        host: pinned int32 host tensors of the step: ``positions [n]``, ``batch_indices [n]`` (0..n-1),
        ``kv_indptr [n + 1]``, ``kv_indices``, ``kv_last_page_len [n]``. input_ids: int64 ``[n]`` on the
        device (pending rows hold anything).
        pending: ``(rows, prev_rows)`` int64 device tensors: ``input_ids[rows] = prev_tokens[prev_rows]``
        (tokens sampled by the previous step, still on the device).
        cascade: the step's two-level cascade groups (`has_cascade` must hold): the cascade graph replays.
        """
        b = self.size_for(n)
        if b is None:
            raise ValueError(f"batch {n} exceeds the largest captured size {self.max_batch}")
        if cascade is not None and not self.has_cascade(n, cascade):
            raise ValueError(f"no cascade graph for a batch of {n} with {cascade.num_levels} levels")
        self._plan(b, host["kv_indptr"], host["kv_indices"], host["kv_last_page_len"])
        if cascade is not None:
            self.cascades[b].plan(cascade, self.plan_args, self.cascade_kwargs, pin=self.device.type == "cuda")
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(host["positions"], non_blocking=True)
        self.batch_indices[:n].copy_(host["batch_indices"], non_blocking=True)
        if n < b:   # padding rows: token 0 at position 0, skipped by the append (the previous replay may differ)
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.batch_indices[n:b].fill_(-1)
        if pending is not None:
            rows, prev_rows = pending
            self.input_ids.index_copy_(0, rows, prev_tokens.index_select(0, prev_rows))
        if cascade is not None:
            if b in self.cascade_graphs:
                self.cascade_graphs[b].replay()
            else:
                self.cascade_outputs[b] = self._forward(b, cascade=True)     # EMULATE_ON_CPU
            return self.cascade_outputs[b][:n]
        if b in self.graphs:
            self.graphs[b].replay()
        else:
            self.outputs[b] = self._forward(b)     # EMULATE_ON_CPU
        return self.outputs[b][:n]

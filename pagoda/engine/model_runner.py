"""Runs scheduled steps on the model: inputs, the step's page table and attention plan, the forward pass
(eager, or a captured CUDA graph for decode-only steps), logits processing and sampling.

A step is launched in two calls so that the engine can overlap the host's work with the device's:
`ModelRunner.launch` queues the forward pass (and the LM head of the sampling rows), `ModelRunner.sample`
queues logits processing, sampling and the copy of the sampled tokens into pinned host memory, and
`InFlightStep.resolve` later waits for that copy: the only host-device synchronisation of a step. The
sampled tokens stay on the device for the next step, whose inputs take them from there
(`Sequence.num_pending_tokens`), so the host can prepare step N+1 before it has read step N's tokens.

Every attention layer of a step shares one plan: `BatchPrefillWithPagedKVCacheWrapper` (causal) when
the step holds prefill tokens (chunks mixed with decodes), `BatchDecodeWithPagedKVCacheWrapper` for
decode-only steps, or the levels of `pagoda.engine.cascade.CascadeDecode` (eager) for decode-only steps
whose requests share prefix pages where ``EngineConfig.cascade`` says it pays. The plans read host
(pinned) copies of the page table; the KV append trusts the metadata the runner built
(``validate=False``: no value is read back). The KV cache is one tensor
``[num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]`` (NHD pages); each attention layer
gets its slice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

import pagoda
from pagoda.engine.block_table import BlockTable
from pagoda.engine.cascade import CascadeDecode, CascadeGroups, cascade_graph_sizes, cascade_groups
from pagoda.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from pagoda.engine.cuda_graph import DecodeGraphs, capture_sizes, graphs_available
from pagoda.engine.host_tables import host_tensor, pack_int32
from pagoda.engine.logits import LogitsPipeline, LogitsProcessor, min_tokens_processor
from pagoda.engine.sampler import compute_logprobs, sample, warm_up_sampler
from pagoda.engine.scheduler import ScheduledBatch
from pagoda.engine.sequence import Sequence
from pagoda.engine.step_inputs import decode_inputs, step_inputs
from pagoda.models import ForwardContext, forward_context

logger = logging.getLogger(__name__)

# FlashInfer's customary float workspace on a GPU (split-KV partial outputs); the CPU path needs none.
WORKSPACE_BYTES = 128 << 20
# Device memory kept back from the KV cache for the decode CUDA graphs beyond their estimated activations: a
# fixed part (the kernels the capture loads, cuBLAS workspaces) and a part per captured graph (its executable and
# outputs). The first engine of a process on an H100 (Qwen3-0.6B shapes, 35 graphs) took 1,162 MiB where the
# activation estimate was 34 MiB: 512 MiB + 24 MiB a graph covers it (1,386 MiB).
GRAPH_RESERVE_BYTES = 512 << 20
GRAPH_BYTES_PER_CAPTURE = 24 << 20


@dataclass
class StepResult:
    """The sequences that sampled in a step, their new tokens, and their logprobs (``(rows, top_ids,
    top_lp, token_lp, rank)`` host lists, see `sampler.compute_logprobs`; None when no one asked)."""
    seqs: list[Sequence]
    token_ids: list[int]
    logprobs: tuple | None


@dataclass
class LaunchedStep:
    """A step whose forward pass is queued: the sampling sequences and their raw logits (device, the model's
    dtype)."""
    seqs: list[Sequence]
    logits: torch.Tensor | None
    graph_batch: int | None = None      # the captured size that ran it (None: eager)
    processors: list | None = None      # the active logits processors, once asked (`ModelRunner.processors_of`)


@dataclass
class InFlightStep:
    """A step whose sampled tokens are queued for the host. ``row_of`` maps a sequence id to its row of
    ``tokens`` (int64 device ``[S]``), which the next step's inputs read."""
    seqs: list[Sequence]
    tokens: torch.Tensor
    row_of: dict[int, int]
    host_tokens: torch.Tensor
    logprobs: tuple | None = None       # (rows, device tensors...) copied to pinned host tensors
    event: object = None
    _result: StepResult | None = field(default=None, repr=False)

    def resolve(self) -> StepResult:
        """Wait for the step's tokens (and logprobs) and return them as host lists (once)."""
        if self._result is None:
            if self.event is not None:
                self.event.synchronize()
            logprobs = None
            if self.logprobs is not None:
                rows, *parts = self.logprobs
                logprobs = (rows, *(p.tolist() for p in parts))
            self._result = StepResult(self.seqs, self.host_tokens.tolist(), logprobs)
        return self._result


def _device_memory(device: torch.device) -> tuple[int, int]:
    """``(bytes allocated by torch, bytes held outside torch's allocator)`` on ``device`` now (0, 0 off CUDA)."""
    if device.type != "cuda":
        return 0, 0
    free, total = torch.cuda.mem_get_info(device)
    return torch.cuda.memory_allocated(device), max((total - free) - torch.cuda.memory_reserved(device), 0)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        from pagoda import models

        self.config = config
        self.device = config.device
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.pin = self.device.type == "cuda"
        # What the process held before this engine (other engines, the caller's tensors): the profile counts
        # only this engine's own memory against gpu_memory_utilization, as vLLM does.
        self._mem_before = _device_memory(self.device)
        model = models.build_model(config.hf_config, self.dtype, self.device)
        if config.load_format == "dummy":
            models.init_dummy_weights(model, seed=config.seed)
        else:
            models.load_weights(model, config.model)
        self.model = model
        self.vocab_size = config.hf_config.vocab_size
        spec = model.kv_cache_spec
        self.num_layers, self.num_kv_heads, self.head_dim = spec.num_layers, spec.num_kv_heads, spec.head_dim
        self.kv_dtype = spec.dtype
        self.num_qo_heads = model.attention_layers()[0].num_heads
        self.plan_kwargs = dict(model.attn_plan_kwargs)
        self.use_cuda_graph = graphs_available(self.device) and not config.enforce_eager
        self.graph_sizes = capture_sizes(config.max_num_seqs) if self.use_cuda_graph else []
        # On a CPU (reference kernels) no split-KV partials: a token workspace, or what graph wrappers need.
        cpu_ws = 4 * max(self.graph_sizes, default=0) * self.num_qo_heads * (self.head_dim + 1) * 4
        self.workspace = torch.empty(WORKSPACE_BYTES if self.device.type == "cuda" else max(cpu_ws, 1024),
                                     dtype=torch.uint8, device=self.device)
        self.prefill_wrapper = pagoda.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode_wrapper = pagoda.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")
        # Decode steps over shared prefix pages (`pagoda.engine.cascade`); a sliding window never cascades (a
        # shared level ignores positions). cascade_steps: cascade steps run, per number of levels.
        self.cascade = CascadeDecode(self.workspace, "NHD")
        self.cascade_mode = config.cascade if self.plan_kwargs.get("window_left", -1) < 0 else "off"
        self.cascade_steps: dict[int, int] = {}
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        # Run in order on each step's logits before sampling (see `pagoda.engine.logits`). A processor may
        # carry ``is_active(seqs) -> bool``: False skips it for that batch (see `needs_exact_state`).
        self.logits_pipeline = LogitsPipeline(config, self.device, self.vocab_size)
        self.logits_processors: list[LogitsProcessor] = [self.logits_pipeline]
        self.max_pages_per_seq = -(-config.max_model_len // self.block_size)
        self.graphs: DecodeGraphs | None = None    # captured once the KV cache exists
        self.num_blocks = self._num_blocks()
        self.kv_cache = torch.zeros(self.num_layers, self.num_blocks, 2, self.block_size, self.num_kv_heads,
                                    self.head_dim, dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(model.attention_layers()):
            layer.kv_cache = self.kv_cache[i]
        logger.debug("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                     self.kv_cache.numel() * self.kv_cache.element_size() / 2**20)
        if self.use_cuda_graph:
            self.graphs = DecodeGraphs(model, self.workspace, self._plan_heads(), self._decode_plan_kwargs(),
                                       self.graph_sizes, self.max_pages_per_seq, config.hf_config.hidden_size,
                                       self.dtype, cascade_graph_sizes(self.cascade_mode, self.graph_sizes))
            self.graphs.capture()
        if self.device.type == "cuda":
            warm_up_sampler(self.device, self.vocab_size, self.dtype, config.max_num_seqs)

    # -- KV cache size -------------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        elt = torch.empty(0, dtype=self.kv_dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elt

    def _num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_gpu_blocks_override is not None:
            return cfg.num_gpu_blocks_override
        per_seq = self.max_pages_per_seq
        if self.device.type != "cuda":
            return max(min(CPU_KV_CACHE_BYTES // self.block_bytes, cfg.max_num_seqs * per_seq), per_seq)
        free_bytes = self._profile_free_bytes() - self.graph_reserve_bytes()
        num = int(free_bytes // self.block_bytes)
        if num < 1:
            raise ValueError(f"no memory left for the KV cache at gpu_memory_utilization="
                             f"{cfg.gpu_memory_utilization} (raise it, or lower max_num_batched_tokens)")
        return num

    def graph_reserve_bytes(self) -> int:
        """Device memory the decode graphs will take (0 without graphs): the activations of the largest
        captured batch (twice, for the allocator's rounding), each size's output, the page-table
        buffers, `GRAPH_RESERVE_BYTES` and `GRAPH_BYTES_PER_CAPTURE` for each graph. The capture measures
        what it really took (`DecodeGraphs.memory_bytes`)."""
        if not self.graph_sizes:
            return 0
        cfg = self.config.hf_config
        elt = torch.empty(0, dtype=self.dtype).element_size()
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        q, kv = self.num_qo_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_token = elt * (2 * (q + 2 * kv) + 2 * q + 4 * hidden + 3 * inter)
        outputs = sum(self.graph_sizes) * hidden * elt
        tables = 4 * max(self.graph_sizes) * (self.max_pages_per_seq + 4)
        cascade = cascade_graph_sizes(self.cascade_mode, self.graph_sizes)
        if cascade:   # their outputs, two more page tables, and the levels' queries, outputs and LSEs
            outputs += sum(cascade) * hidden * elt
            tables += 2 * tables
            per_token += elt * 4 * q + 8 * self.num_qo_heads
        graphs = len(self.graph_sizes) + len(cascade)
        return (2 * per_token * max(self.graph_sizes) + outputs + tables + GRAPH_RESERVE_BYTES
                + graphs * GRAPH_BYTES_PER_CAPTURE)

    @torch.inference_mode()
    def _profile_free_bytes(self) -> int:
        """Bytes for the KV cache: ``gpu_memory_utilization`` of the device, less the weights, the peak
        activations of a forward pass over ``max_num_batched_tokens`` tokens in ``max_num_seqs``
        sequences (logits and sampling included) and what other processes and libraries hold."""
        cfg = self.config
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = cfg.max_num_batched_tokens
        num_seqs = min(cfg.max_num_seqs, num_tokens)
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        seqs, next_block = [], 0
        from pagoda.engine.sampling_params import SamplingParams
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, max_tokens=1)
        for n in lens:
            seq = Sequence("profile", 0, [0] * n, params, 1, frozenset(), None, 0.0)
            pages = -(-n // self.block_size)
            seq.block_table = BlockTable(range(next_block, next_block + pages))
            next_block += pages
            seqs.append(seq)
        temp = torch.zeros(self.num_layers, next_block, 2, self.block_size, self.num_kv_heads, self.head_dim,
                           dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.model.attention_layers()):
            layer.kv_cache = temp[i]
        self.execute(ScheduledBatch(seqs, lens))   # every sequence samples: max_num_seqs logits rows
        torch.cuda.synchronize(self.device)
        for layer in self.model.attention_layers():
            layer.kv_cache = None
        allocated_before, non_torch_before = self._mem_before
        peak = torch.cuda.max_memory_allocated(self.device) - temp.numel() * temp.element_size() - allocated_before
        del temp
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device) - non_torch_before
        budget = int(total * cfg.gpu_memory_utilization) - peak - max(non_torch, 0)
        # Never more than is free now (less a margin for the allocator's rounding): another engine or tensor of
        # this process, or another process, may hold memory this engine's share would otherwise count on.
        budget = min(budget, int(free * 0.97) - max(peak - torch.cuda.memory_allocated(self.device)
                                                    + allocated_before, 0))
        logger.debug("memory profile: total %.2f GiB, peak %.2f GiB, other %.2f GiB, KV budget %.2f GiB",
                     total / 2**30, peak / 2**30, non_torch / 2**30, budget / 2**30)
        return budget

    # -- one step ------------------------------------------------------------------------------------------
    def _plan_heads(self) -> tuple:
        return self.num_qo_heads, self.num_kv_heads, self.head_dim, self.block_size

    def _decode_plan_kwargs(self) -> dict:
        kw = self.plan_kwargs
        return dict(window_left=kw.get("window_left", -1), logits_soft_cap=kw.get("logits_soft_cap"),
                    sm_scale=kw.get("sm_scale"), q_data_type=self.dtype, kv_data_type=self.kv_dtype)

    def _inputs(self, batch: ScheduledBatch, prev: InFlightStep | None) -> dict:
        """Host arrays of a step (`step_inputs.step_inputs`); ``prev``: the step whose tokens are not yet read
        back."""
        return step_inputs(batch, prev.row_of if prev is not None else {}, self.block_size)

    def _decode_inputs(self, batch: ScheduledBatch, row_of: dict) -> dict:
        """`step_inputs.decode_inputs` at this runner's page size."""
        return decode_inputs(batch, row_of, self.block_size)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: InFlightStep | None = None) -> LaunchedStep:
        """Queue the forward pass of ``batch`` (and the LM head of its sampling rows). ``prev``: the step
        whose tokens are not yet read back (its sampled tokens feed this step's pending inputs)."""
        inp = self._inputs(batch, prev)
        n_tok, n_req = len(inp["ids"]), len(batch.seqs)
        # One pinned int32 and one int64 host tensor, one copy each to the device.
        names = ("positions", "batch_indices", "qo_indptr", "kv_indptr", "last", "sample_rows", "kv_indices")
        host32, spans = pack_int32([inp[k] for k in names], self.pin)
        host64 = host_tensor(inp["ids"] + inp["pend_rows"] + inp["pend_src"], torch.int64, self.pin)
        host = {k: host32[a:b] for k, (a, b) in zip(names, spans, strict=True)}
        dev64 = host64.to(self.device, non_blocking=True)
        ids = dev64[:n_tok]
        k = len(inp["pend_rows"])
        pending = (dev64[n_tok:n_tok + k], dev64[n_tok + k:]) if k else None
        sampling = inp["sampling"]
        graph_b = None
        groups = self._cascade_groups(batch, inp) if batch.is_decode_only else None
        graphs = self.graphs
        if (graphs is not None and batch.is_decode_only and n_req <= graphs.max_batch
                and (groups is None or graphs.has_cascade(n_req, groups))):
            graph_b = graphs.size_for(n_req)
            graph_host = dict(positions=host["positions"], batch_indices=host["batch_indices"],
                              kv_indptr=host["kv_indptr"], kv_indices=host["kv_indices"],
                              kv_last_page_len=host["last"])
            hidden = graphs.replay(n_req, graph_host, ids, pending, prev.tokens if pending else None, groups)
            rows = None if len(sampling) == n_req else host["sample_rows"].to(self.device, non_blocking=True)
        else:
            dev32 = host32.to(self.device, non_blocking=True)
            dv = {k2: dev32[a:b] for k2, (a, b) in zip(names, spans, strict=True)}
            if pending is not None:
                ids.index_copy_(0, pending[0], prev.tokens.index_select(0, pending[1]))
            wrapper = self._plan_cascade(groups) if groups is not None else self._plan(host, batch.is_decode_only)
            ctx = ForwardContext(wrapper=wrapper, batch_indices=dv["batch_indices"], positions=dv["positions"],
                                 kv_indices=dv["kv_indices"], kv_indptr=dv["kv_indptr"], kv_last_page_len=dv["last"],
                                 validate=False)
            with forward_context(ctx):
                hidden = self.model(ids, dv["positions"])
            rows = None if len(sampling) == n_tok else dv["sample_rows"]
        if not sampling:
            return LaunchedStep([], None, graph_b)
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        # Logits in the model's dtype: the sampler and the logprobs read them as float32 themselves (the
        # logits processors get a float32 copy), so no float32 copy of every row's vocabulary is written.
        return LaunchedStep(sampling, self.model.compute_logits(hidden, float32=False), graph_b)

    def active_processors(self, seqs: list[Sequence]) -> list[LogitsProcessor]:
        """The logits processors that act on a batch of sampling ``seqs``: the min-tokens processor while
        one of them has fewer than ``min_tokens`` output tokens (pending ones counted), every other one
        unless its ``is_active(seqs)`` says False."""
        active = []
        for p in self.logits_processors:
            if p is min_tokens_processor:
                on = any(s.num_output_tokens + s.num_pending_tokens < s.params.min_tokens for s in seqs)
            else:
                check = getattr(p, "is_active", None)
                on = True if check is None else bool(check(seqs))
            if on:
                active.append(p)
        return active

    def processors_of(self, step: LaunchedStep) -> list[LogitsProcessor]:
        """`active_processors` of a step's sampling sequences, found once a step. (Reading the previous step's
        tokens between the two calls moves tokens from pending to output: the counts the checks use stay.)"""
        if step.processors is None:
            step.processors = self.active_processors(step.seqs)
        return step.processors

    def needs_exact_state(self, step: LaunchedStep) -> bool:
        """True when the step's logits processors must see every earlier token (so the engine reads the
        previous step's tokens before sampling this one); False lets sampling follow the forward pass
        at once."""
        # A processor may say it keeps its state on the device (``needs_host_tokens(seqs)`` False).
        return bool(step.seqs) and any(getattr(p, "needs_host_tokens", lambda seqs: True)(step.seqs)
                                       for p in self.processors_of(step))

    def begin_sampling(self, step: LaunchedStep, result: StepResult) -> None:
        """The tokens of the previous step were just read (``result``) and ``step`` samples after them: let
        its processors start the host work that needs those tokens (a grammar's bitmask) while the engine
        processes them."""
        token_of = None
        for p in self.processors_of(step):
            begin = getattr(p, "begin_sampling", None)
            if begin is not None:
                if token_of is None:
                    token_of = {s.seq_id: t for s, t in zip(result.seqs, result.token_ids)}
                begin(step.seqs, token_of)

    @torch.inference_mode()
    def sample(self, step: LaunchedStep) -> InFlightStep | None:
        """Queue logits processing, sampling and the copy of the tokens (and logprobs) to the host."""
        seqs = step.seqs
        if not seqs:
            return None
        raw_logits = step.logits
        processors = self.processors_of(step)
        logits = raw_logits
        if processors:
            # The processors work in float32, in place; logprobs are of the raw logits: keep them apart.
            logits = raw_logits.float()
            if logits is raw_logits and any(s.params.logprobs is not None for s in seqs):
                logits = raw_logits.clone()
        for processor in processors:
            logits = processor(logits, seqs)
        tokens = sample(logits, seqs, self.generator)
        self.logits_pipeline.on_sampled(seqs, tokens)   # device-side counts (no-op unless it ran)
        logprobs = compute_logprobs(raw_logits, tokens, seqs)
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=self.pin)
        host_tokens.copy_(tokens, non_blocking=True)
        if logprobs is not None:
            rows, *parts = logprobs
            host_parts = []
            for p in parts:
                h = torch.empty(p.shape, dtype=p.dtype, pin_memory=self.pin)
                host_parts.append(h.copy_(p, non_blocking=True))
            logprobs = (rows, *host_parts)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return InFlightStep(seqs, tokens, {s.seq_id: i for i, s in enumerate(seqs)}, host_tokens, logprobs, event)

    def execute(self, batch: ScheduledBatch, prev: InFlightStep | None = None) -> StepResult:
        """Launch, sample and read back one step (no overlap)."""
        step = self.sample(self.launch(batch, prev))
        return step.resolve() if step is not None else StepResult([], [], None)

    def _cascade_groups(self, batch: ScheduledBatch, inp: dict) -> CascadeGroups | None:
        """The groups of a decode-only step whose requests share prefix pages, when ``cascade_mode`` says it
        cascades (`pagoda.engine.cascade.cascade_groups`); else None. Counts the step in ``cascade_steps``."""
        if self.cascade_mode == "off":
            return None
        ptr = inp["kv_indptr"]
        pages = [ptr[i + 1] - ptr[i] for i in range(len(batch.seqs))]
        groups = cascade_groups(self.cascade_mode, [s.block_table for s in batch.seqs], pages, inp["last"],
                                self.block_size)
        if groups is not None:
            self.cascade_steps[groups.num_levels] = self.cascade_steps.get(groups.num_levels, 0) + 1
        return groups

    def _plan_cascade(self, groups: CascadeGroups) -> CascadeDecode:
        """The eager cascade attention of a step (one outside the cascade graphs), planned."""
        kw = self._decode_plan_kwargs()
        kw.pop("window_left")
        return self.cascade.plan(groups, self._plan_heads(), kw, self.pin)

    def _plan(self, host: dict[str, torch.Tensor], decode_only: bool):
        """Plan the step's wrapper once (every layer runs it), from host tensors (no device read)."""
        heads = self._plan_heads()
        if decode_only:
            self.decode_wrapper.plan(host["kv_indptr"], host["kv_indices"], host["last"], *heads,
                                     **self._decode_plan_kwargs())
            return self.decode_wrapper
        self.prefill_wrapper.plan(host["qo_indptr"], host["kv_indptr"], host["kv_indices"], host["last"], *heads,
                                  causal=True, q_data_type=self.dtype, kv_data_type=self.kv_dtype, **self.plan_kwargs)
        return self.prefill_wrapper

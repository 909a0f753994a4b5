"""Runs one scheduled step on the model: inputs, the step's page table and attention plan, the forward
pass, logits of the sampling rows, logits processing and sampling.

Every attention layer of a step shares one plan: `BatchPrefillWithPagedKVCacheWrapper` (causal) when
the step holds prefill tokens (chunks mixed with decodes), `BatchDecodeWithPagedKVCacheWrapper` for
decode-only steps. The KV cache is one tensor ``[num_layers, num_blocks, 2, block_size, num_kv_heads,
head_dim]`` (NHD pages); each attention layer gets its slice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import pagoda
from pagoda.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from pagoda.engine.logits import LogitsProcessor, min_tokens_processor
from pagoda.engine.sampler import compute_logprobs, sample
from pagoda.engine.scheduler import ScheduledBatch
from pagoda.engine.sequence import Sequence
from pagoda.models import ForwardContext, forward_context

logger = logging.getLogger(__name__)

# FlashInfer's customary float workspace on a GPU (split-KV partial outputs); the CPU path needs none.
WORKSPACE_BYTES = 128 << 20


@dataclass
class StepResult:
    """The sequences that sampled this step, their new tokens, and their logprobs (see
    `sampler.compute_logprobs`; None when no one asked)."""
    seqs: list[Sequence]
    token_ids: list[int]
    logprobs: tuple | None


class ModelRunner:
    def __init__(self, config: EngineConfig):
        from pagoda import models

        self.config = config
        self.device = config.device
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
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
        ws = torch.empty(WORKSPACE_BYTES if self.device.type == "cuda" else 1024, dtype=torch.uint8, device=self.device)
        self.prefill_wrapper = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        self.decode_wrapper = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        # Run in order on each step's logits before sampling (see `pagoda.engine.logits`).
        self.logits_processors: list[LogitsProcessor] = [min_tokens_processor]
        self.num_blocks = self._num_blocks()
        self.kv_cache = torch.zeros(self.num_layers, self.num_blocks, 2, self.block_size, self.num_kv_heads,
                                    self.head_dim, dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(model.attention_layers()):
            layer.kv_cache = self.kv_cache[i]
        logger.debug("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                     self.kv_cache.numel() * self.kv_cache.element_size() / 2**20)

    # -- KV cache size -------------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        elt = torch.empty(0, dtype=self.kv_dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elt

    def _num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_gpu_blocks_override is not None:
            return cfg.num_gpu_blocks_override
        per_seq = -(-cfg.max_model_len // self.block_size)
        if self.device.type != "cuda":
            return max(min(CPU_KV_CACHE_BYTES // self.block_bytes, cfg.max_num_seqs * per_seq), per_seq)
        free_bytes = self._profile_free_bytes()
        num = int(free_bytes // self.block_bytes)
        if num < 1:
            raise ValueError(f"no memory left for the KV cache at gpu_memory_utilization="
                             f"{cfg.gpu_memory_utilization} (raise it, or lower max_num_batched_tokens)")
        return num

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
            seq.block_table = list(range(next_block, next_block + pages))
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
        peak = torch.cuda.max_memory_allocated(self.device) - temp.numel() * temp.element_size()
        del temp
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        budget = int(total * cfg.gpu_memory_utilization) - peak - max(non_torch, 0)
        logger.debug("memory profile: total %.2f GiB, peak %.2f GiB, other %.2f GiB, KV budget %.2f GiB",
                     total / 2**30, peak / 2**30, non_torch / 2**30, budget / 2**30)
        return budget

    # -- one step ------------------------------------------------------------------------------------------
    def _to_device(self, values: list[int], dtype=torch.int32) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype, pin_memory=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Compute the KV of the scheduled tokens and sample for every sequence whose last token was among
        them. One host read: the sampled tokens (and the logprobs, when asked)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        qo_indptr, kv_indptr, kv_indices, last_page_len = [0], [0], [], []
        batch_indices: list[int] = []
        sample_rows: list[int] = []
        sampling: list[Sequence] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            batch_indices += [i] * n
            qo_indptr.append(qo_indptr[-1] + n)
            pages = -(-end // bs)
            kv_indices += seq.block_table[:pages]
            kv_indptr.append(kv_indptr[-1] + pages)
            last_page_len.append(end - (pages - 1) * bs)
            if end == seq.num_tokens:
                sample_rows.append(qo_indptr[-1] - 1)
                sampling.append(seq)
        host = {name: torch.tensor(v, dtype=torch.int32) for name, v in
                (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices),
                 ("last", last_page_len))}
        wrapper = self._plan(host, batch.is_decode_only)
        positions_d = self._to_device(positions)
        ctx = ForwardContext(
            wrapper=wrapper, batch_indices=self._to_device(batch_indices), positions=positions_d,
            kv_indices=self._to_device(kv_indices), kv_indptr=self._to_device(kv_indptr),
            kv_last_page_len=self._to_device(last_page_len))
        with forward_context(ctx):
            hidden = self.model(self._to_device(input_ids, torch.int64), positions_d)
        if not sampling:
            return StepResult([], [], None)
        raw_logits = self.model.compute_logits(hidden[self._to_device(sample_rows, torch.int64)])
        # Logprobs are of the raw logits: keep them apart from the processors' in-place edits.
        wants_logprobs = any(s.params.logprobs is not None for s in sampling)
        logits = raw_logits.clone() if wants_logprobs and self.logits_processors else raw_logits
        for processor in self.logits_processors:
            logits = processor(logits, sampling)
        tokens = sample(logits, sampling, self.generator)
        logprobs = compute_logprobs(raw_logits, tokens, sampling)
        return StepResult(sampling, tokens.tolist(), logprobs)

    def _plan(self, host: dict[str, torch.Tensor], decode_only: bool):
        """Plan the step's wrapper once (every layer runs it). Plans read host tensors."""
        kw = self.plan_kwargs
        heads = (self.num_qo_heads, self.num_kv_heads, self.head_dim, self.block_size)
        if decode_only:
            self.decode_wrapper.plan(host["kv_indptr"], host["kv_indices"], host["last"], *heads,
                                     window_left=kw.get("window_left", -1),
                                     logits_soft_cap=kw.get("logits_soft_cap"), sm_scale=kw.get("sm_scale"),
                                     q_data_type=self.dtype, kv_data_type=self.kv_dtype)
            return self.decode_wrapper
        self.prefill_wrapper.plan(host["qo_indptr"], host["kv_indptr"], host["kv_indices"], host["last"], *heads,
                                  causal=True, q_data_type=self.dtype, kv_data_type=self.kv_dtype, **kw)
        return self.prefill_wrapper

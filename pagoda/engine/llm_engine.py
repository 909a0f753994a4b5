"""`LLMEngine`: the step-level engine (vLLM's interface) that `LLM` and a server drive.

``add_request`` validates and queues a request, ``step`` runs one scheduled model step and returns the
outputs of the requests it advanced, ``abort_request`` drops requests.

The host works one step ahead of the device: ``step`` schedules step N+1 and queues its forward pass
while step N may still run, then reads step N's sampled tokens (the one host-device synchronisation)
and processes them (stop checks, incremental detokenization, stop strings, the requests'
`RequestOutput` as their ``output_kind`` asks) while the device computes step N+1. Step N+1's inputs
take step N's tokens from device memory. A sequence that step N finishes (a stop token, a stop
string) may already be in step N+1: that row's work is dropped. The first ``step`` of a batch returns
no token yet; every later one returns the previous step's. The same bookkeeping runs on the CPU (where
each launch completes at once).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pagoda.engine.block_manager import BlockManager
from pagoda.engine.config import EngineConfig
from pagoda.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from pagoda.engine.model_runner import InFlightStep, ModelRunner, StepResult
from pagoda.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pagoda.engine.sampling_params import RequestOutputKind, SamplingParams
from pagoda.engine.scheduler import ScheduledBatch, Scheduler
from pagoda.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        seqs, done = self.seqs, SequenceStatus.FINISHED
        return seqs[0].status is done if len(seqs) == 1 else all(s.status is done for s in seqs)


@dataclass
class StepStats:
    """Counters of the steps run: how many, how many decode-only and replayed from a CUDA graph, and the
    host's time in ``step`` outside the wait for the device (``host_s``) and in it (``wait_s``)."""
    steps: int = 0
    decode_steps: int = 0
    graph_steps: int = 0
    tokens: int = 0
    host_s: float = 0.0
    wait_s: float = 0.0
    decode_host_s: float = 0.0
    decode_wait_s: float = 0.0
    # Each decode step's host seconds, when a caller asks for them (a list; None: not kept, since a serving
    # engine's stats live as long as the process).
    decode_host_steps: list[float] | None = None

    def add(self, batch: ScheduledBatch, graph_batch: int | None, host_s: float, wait_s: float) -> None:
        self.steps += 1
        self.tokens += batch.num_tokens
        self.host_s += host_s
        self.wait_s += wait_s
        if batch.is_decode_only:
            self.decode_steps += 1
            self.decode_host_s += host_s
            self.decode_wait_s += wait_s
            if self.decode_host_steps is not None:
                self.decode_host_steps.append(host_s)
        if graph_batch is not None:
            self.graph_steps += 1


def _eos_ids(tokenizer, model_dir: str) -> frozenset[int]:
    """The tokenizer's EOS and those of the model's generation_config.json (some models end turns with
    a token other than the tokenizer's EOS)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return frozenset(ids)


class LLMEngine:
    """The engine over one model. ``LLMEngine(EngineConfig(model_dir, ...))`` or
    ``LLMEngine.from_kwargs(model_dir, **engine_settings)``."""

    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        # Tensor parallelism: this process is rank 0 (under torchrun the other ranks never return from here:
        # they serve rank 0's steps, then exit). See `pagoda.engine.executor`.
        self.executor = None
        if config.tensor_parallel_size > 1:
            from pagoda.engine.executor import TensorParallelExecutor
            self.executor = TensorParallelExecutor(config)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model, local_files_only=True)
        except BaseException:
            self.shutdown()
            raise
        self.model_runner = ModelRunner(config) if self.executor is None else self.executor.runner
        self.vocab_size = self.model_runner.vocab_size
        self.block_manager = BlockManager(self.model_runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.eos_token_ids = _eos_ids(self.tokenizer, config.model)
        self.requests: dict[str, _Request] = {}
        self.num_steps = 0
        self._in_flight: InFlightStep | None = None    # launched, tokens not yet read back
        self.stats = StepStats()
        # Set to a dict to record, per (request_id, index), the time.perf_counter() at which each token was
        # read back (benchmarks: time to first token, inter-token latency).
        self.token_times: dict[tuple[str, int], list[float]] | None = None

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> LLMEngine:
        return cls(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self):
        return self.tokenizer

    # -- requests ------------------------------------------------------------------------------------------
    def _parse_prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown or not prompt:
                raise ValueError(f"a prompt dict has 'prompt' (text) or 'prompt_token_ids', got keys {sorted(prompt)}")
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if text is not None and not isinstance(text, str):
                raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        else:
            raise TypeError(f"prompt must be a str, {{'prompt': str}} or {{'prompt_token_ids': [...]}}, "
                            f"got {type(prompt).__name__}")
        if ids is None:
            if not text:
                raise ValueError("prompt is empty")
            return text, self.tokenizer.encode(text)
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or (set(map(type, ids)) - {int} and not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids)):    # (the set: plain ints, at C speed)
            raise TypeError("prompt_token_ids must be a list of int")
        if not ids:
            raise ValueError("prompt_token_ids is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            raise ValueError(f"prompt_token_ids has ids outside the vocabulary [0, {self.vocab_size}): {bad[:8]}")
        return text, list(ids)

    def add_request(self, request_id: str, prompt, params: SamplingParams, arrival_time: float | None = None) -> None:
        """Queue a request. ``prompt``: a str, ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}``.
        ValueError (naming what is wrong) for a duplicate id, an empty prompt, ids outside the vocabulary,
        or a request that could never fit in ``max_model_len`` or the KV cache; the engine is unchanged."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} is more than max_logprobs={self.config.max_logprobs}")
        text, ids = self._parse_prompt(prompt)
        max_len = self.config.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"the prompt (length {len(ids)}) is too long: max_model_len is {max_len} and at least "
                             "one token must be generated")
        max_tokens = params.max_tokens if params.max_tokens is not None else max_len - len(ids)
        if len(ids) + max_tokens > max_len:
            raise ValueError(f"prompt length {len(ids)} + max_tokens {max_tokens} exceeds max_model_len {max_len}")
        needed = self.block_manager.blocks_for(len(ids) + max_tokens - 1)   # the last token's KV is never needed
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"the request needs up to {needed} KV blocks but the cache has "
                             f"{self.block_manager.num_blocks}: it could never run (lower max_tokens or the prompt, "
                             "or give the cache more blocks)")
        params = params.clone()
        # Model-dependent checks of the logits processing (vocabulary ids, bad words, grammar): ValueError here.
        self.model_runner.logits_pipeline.prepare(params, self.tokenizer, self.eos_token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        device = self.model_runner.device
        seqs = []
        for i in range(params.n):
            gen = None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed + i)
            seq = Sequence(request_id, i, ids, params, max_tokens, self.eos_token_ids, gen, arrival)
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            seqs.append(seq)
        self.requests[request_id] = _Request(request_id, text, list(ids), params, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Drop requests (unknown or finished ids are ignored); their pages are released at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- stepping ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; return a RequestOutput for each request it advanced (as its output_kind says).

        Queues the next step before reading the previous one's tokens (module docstring): the outputs
        returned are those of the previous step. Under tensor parallelism an exception that escapes a
        step (a rank that died: `pagoda.engine.executor.WorkerError`; Ctrl-C) shuts every rank down."""
        if self.executor is None:
            return self._step()
        self.executor.check()
        try:
            return self._step()
        except BaseException as e:
            raise self.executor.fail(e) from None

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list:
        """vLLM's: call ``method`` on every rank's worker (`pagoda.engine.worker.Worker`: a method name such
        as ``"info"`` or ``"weight_bytes"``, or a module-level function taking the worker first); the results
        in rank order (one process: a list of one)."""
        if self.executor is not None:
            return self.executor.collective_rpc(method, timeout, args, kwargs)
        if timeout is not None:
            raise NotImplementedError("collective_rpc(timeout=...) is not supported")
        from pagoda.engine.distributed import ParallelState
        from pagoda.engine.worker import RpcError, Worker, call

        worker = Worker(ParallelState(0, 1, self.model_runner.device, None, "none"), self.model_runner)
        out = call(worker, method, tuple(args), dict(kwargs or {}))
        if isinstance(out, RpcError):
            raise RuntimeError(f"collective_rpc({method!r}) raised:\n{out.text}")
        return [out]

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (if any) and leave the process group; idempotent. Also runs
        at interpreter exit."""
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        runner = self.model_runner
        batch = self.scheduler.schedule()
        prev = self._in_flight
        if not batch.seqs and prev is None:
            if self.scheduler.has_unfinished():   # every request fits the cache alone: this is a bug, not a wait
                raise RuntimeError("the scheduler found nothing to run while requests are unfinished")
            return []
        launched = new = None
        if batch.seqs:
            launched = runner.launch(batch, prev)
            self.scheduler.update_after_step(batch)
            if not runner.needs_exact_state(launched):
                new = runner.sample(launched)     # queued right behind the forward pass
        outputs: list[RequestOutput] = []
        wait = 0.0
        if prev is not None:
            t1 = time.perf_counter()
            result = prev.resolve()
            wait = time.perf_counter() - t1
            if launched is not None and new is None:
                runner.begin_sampling(launched, result)     # e.g. grammar masks, filled while we process
            outputs = self._process(result)
            self.scheduler.cache_blocks(result.seqs)
        if launched is not None and new is None:
            new = runner.sample(launched)         # processors that must see the tokens just read
        if new is not None:
            for seq in new.seqs:
                seq.num_pending_tokens += 1
            if not self.config.async_scheduling:     # read this step's tokens now (no overlap)
                t1 = time.perf_counter()
                result = new.resolve()
                wait += time.perf_counter() - t1
                outputs += self._process(result)
                self.scheduler.cache_blocks(result.seqs)
                new = None
        self._in_flight = new
        if batch.seqs:
            self.num_steps += 1
            self.stats.add(batch, launched.graph_batch, time.perf_counter() - t0 - wait, wait)
        if logger.isEnabledFor(logging.DEBUG) and batch.seqs:
            logger.debug("step %d: %d seqs, %d tokens (%s%s); running %d, waiting %d; KV usage %.1f%%, prefix-cache "
                         "hit rate %.1f%%", self.num_steps, len(batch.seqs), batch.num_tokens,
                         "decode" if batch.is_decode_only else "prefill",
                         f", graph {launched.graph_batch}" if launched.graph_batch else "",
                         len(self.scheduler.running), len(self.scheduler.waiting), 100 * self.block_manager.usage,
                         100 * self.block_manager.hit_rate)
        return outputs

    def _process(self, result: StepResult) -> list[RequestOutput]:
        """Append a step's tokens (read back) to their sequences; the outputs of the requests they advanced.
        Sequences finished meanwhile (a stop in the step before, an abort) drop theirs."""
        touched: dict[str, _Request] = {}
        times, now = self.token_times, time.perf_counter()
        lp = result.logprobs
        lp_row = {row: j for j, row in enumerate(lp[0])} if lp is not None else {}
        requests, finished_status = self.requests, SequenceStatus.FINISHED
        append = self._append_token
        for i, (seq, token) in enumerate(zip(result.seqs, result.token_ids, strict=True)):
            seq.num_pending_tokens -= 1
            if seq.status is finished_status:
                continue
            logprobs = None
            if lp_row and i in lp_row:
                j = lp_row[i]
                logprobs = self._logprobs_entry(seq, token, lp[1][j], lp[2][j], lp[3][j], lp[4][j])
            append(seq, token, logprobs)
            rid = seq.request_id
            if rid not in touched:
                touched[rid] = requests[rid]
            if times is not None:
                times.setdefault((rid, seq.index), []).append(now)
        outputs = []
        final_only = RequestOutputKind.FINAL_ONLY
        for req in touched.values():
            finished = req.finished
            if finished or req.params.output_kind is not final_only:   # (a FINAL_ONLY request: only at the end)
                out = self._make_output(req, finished)
                if out is not None:
                    outputs.append(out)
            if finished:
                del self.requests[req.request_id]
        return outputs

    def _logprobs_entry(self, seq, token, top_ids, top_lp, token_lp, rank) -> dict[int, Logprob]:
        """vLLM's layout: the sampled token first, then the k most likely (the sampled one counted once)."""
        entry = {token: Logprob(token_lp, rank, self._token_text(token))}
        k = seq.params.logprobs
        for r, (tid, value) in enumerate(zip(top_ids[:k], top_lp[:k], strict=True), start=1):
            if tid not in entry:
                entry[tid] = Logprob(value, r, self._token_text(tid))
        return entry

    def _token_text(self, token_id: int) -> str:
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        # A model's vocabulary may be larger than its tokenizer's (padding rows, dummy checkpoints): such an
        # id has no text, as in vLLM.
        return "" if token is None else self.tokenizer.convert_tokens_to_string([token])

    def _append_token(self, seq: Sequence, token: int, logprobs: dict[int, Logprob] | None) -> None:
        """Add a sampled token; finish the sequence on a stop condition (vLLM's order of checks)."""
        params = seq.params
        token_ids = seq.token_ids
        token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
        finish: tuple[str, int | str | None] | None = None
        num_output = len(token_ids) - seq.num_prompt_tokens
        if num_output >= params.min_tokens:     # (min_tokens <= max_tokens)
            if not params.ignore_eos and token in seq.eos_token_ids:
                finish = ("stop", None)
            elif params.stop_token_ids and token in params.stop_token_ids:
                finish = ("stop", token)
            elif num_output >= seq.max_tokens or len(token_ids) >= self.config.max_model_len:
                finish = ("length", None)
        detok = seq.detokenizer
        cut = None
        if finish is None or finish[0] != "stop" or params.include_stop_str_in_output:
            delta = detok.add(token)
            if params.stop and num_output > params.min_tokens:
                hit = find_stop_string(detok.output_text, len(delta), params.stop, params.include_stop_str_in_output)
                if hit is not None:
                    finish, cut = ("stop", hit[0]), hit[1]
        if finish is None:
            return
        if cut is not None:
            detok.output_text = detok.output_text[:cut]
        else:
            detok.flush()
        seq.finish_reason, seq.stop_reason = finish
        self.scheduler.finish(seq)

    def _make_output(self, req: _Request, finished: bool) -> RequestOutput | None:
        """The request's output as its ``output_kind`` says (None: nothing to send). DELTA outputs slice only
        what is new (the text and token ids after what was sent), so a step's cost does not grow with the
        length of the outputs; the text withheld for stop strings (``output_text_buffer_length``) waits until
        the sequence finishes."""
        kind = req.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        delta = kind is RequestOutputKind.DELTA
        held = req.params.output_text_buffer_length
        for seq in req.seqs:
            done = seq.status is SequenceStatus.FINISHED
            text = seq.detokenizer.output_text
            end = len(text) if done else max(len(text) - held, 0)
            logprobs = seq.logprobs
            if delta:
                n = len(seq.token_ids) - seq.num_prompt_tokens
                if seq.final_sent or (n == seq.sent_tokens and not done):
                    continue
                start = seq.num_prompt_tokens + seq.sent_tokens
                tokens = seq.token_ids[start:]
                if logprobs is not None:
                    logprobs = logprobs[seq.sent_tokens:]
                text = text[seq.sent_text:end] if end > seq.sent_text else ""
                seq.sent_text, seq.sent_tokens, seq.final_sent = max(end, seq.sent_text), n, done
            else:
                tokens = seq.token_ids[seq.num_prompt_tokens:]
                text = text[:end]
                logprobs = list(logprobs) if logprobs is not None else None
            completions.append(CompletionOutput(seq.index, text, tokens, seq.cumulative_logprob, logprobs,
                                                seq.finish_reason, seq.stop_reason))
        seqs = req.seqs
        cached = seqs[0].num_cached_tokens if len(seqs) == 1 else max(s.num_cached_tokens for s in seqs)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, None, completions, finished,
                             num_cached_tokens=cached)

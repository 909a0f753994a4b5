"""Structured output through xgrammar (the library vLLM and SGLang use): a request's
`StructuredOutputsParams` becomes a grammar, compiled once per distinct constraint on a thread pool, and a
grammar matcher per sequence that fills the next step's token bitmask on the host.

At ``add_request`` (`prepare`) the constraint is parsed into an ``xgrammar.Grammar``, which is cheap and
finds what xgrammar rejects (a ValueError then); the expensive compilation against the vocabulary runs on
the pool, cached by the constraint (`StructuredOutputsParams.cache_key`), so that add_request returns at once
and the engine keeps stepping other requests. A sequence's matcher is created at its first sampling step
(waiting for its compilation only if it is not finished by then). Each step the host advances the matchers
with the tokens sampled since, fills one int32 bitmask row per constrained row (``[rows, cdiv(vocab, 32)]``,
in pinned memory) while the device still runs the forward pass, copies it over, and
``xgrammar.apply_token_bitmask_inplace`` sets the forbidden logits to ``-inf`` on the device.

The per-step host work goes through xgrammar's batch calls (``BatchGrammarMatcher.batch_accept_token`` and
``batch_fill_next_token_bitmask``), which run in C++ without the GIL: the constrained rows are split into
contiguous chunks, one per worker thread (``fill_threads``, by default half the cores, at most 8), each
advancing and filling its own matchers and bitmask rows.

The matcher must see every sampled token before the next mask is filled. The engine reads a step's tokens
one step behind; the moment it has them it starts the next step's fill (`start_fill`, through
`LogitsPipeline.begin_sampling`) and turns the tokens into outputs while the fill threads work, so the fill
costs the step only what it takes beyond that. Filled any other way (`fill`), a constrained row whose last
token is still on the device costs one synchronisation to read it.
Optional dependency: ``pip install 'pagoda[structured]'``.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pagoda.engine.structured_params import StructuredOutputsParams

logger = logging.getLogger(__name__)


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise ValueError("structured_outputs needs xgrammar: pip install 'pagoda[structured]'") from e
    return xgrammar


def _choice_grammar(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def build_grammar(so: StructuredOutputsParams):
    """The ``xgrammar.Grammar`` of a constraint; ValueError naming the field when xgrammar rejects it."""
    xgr = _xgrammar()
    try:
        if so.json is not None:
            schema = json.dumps(so.json) if isinstance(so.json, dict) else so.json
            return xgr.Grammar.from_json_schema(schema, any_whitespace=not so.disable_any_whitespace,
                                                strict_mode=True)
        if so.json_object:
            return xgr.Grammar.builtin_json_grammar()
        if so.json_object is not None:
            raise ValueError("json_object must be True when given")
        if so.regex is not None:
            return xgr.Grammar.from_regex(so.regex)
        if so.choice is not None:
            return xgr.Grammar.from_ebnf(_choice_grammar(so.choice))
        if so.grammar is not None:
            return xgr.Grammar.from_ebnf(so.grammar)
        return xgr.Grammar.from_structural_tag(so.structural_tag)
    except ValueError:
        raise
    except Exception as e:      # xgrammar raises RuntimeError (and its own error types) for bad input
        field = next(f for f in ("json", "regex", "choice", "grammar", "structural_tag") if getattr(so, f) is not None)
        raise ValueError(f"structured_outputs.{field} is rejected by xgrammar: {e}") from None


class _Matcher:
    """A sequence's matcher and how far it has read the sequence's output: ``consumed`` output tokens
    accepted (or the one rejected counted), ``ok`` False once a token was rejected (the output is no longer
    constrained), ``terminated`` once a stop token was accepted."""

    __slots__ = ("matcher", "consumed", "ok", "terminated")

    def __init__(self, matcher):
        self.matcher = matcher
        self.consumed = 0
        self.ok = True
        self.terminated = False


class PendingFill:
    """A step's bitmask being filled: ``result()`` waits for the fill threads and returns the host bitmask, or
    None when no row is constrained any more (`StructuredOutputManager.fill`)."""

    def __init__(self, bitmask: torch.Tensor, parts: list):
        self.bitmask = bitmask
        self.parts = parts                          # bools (filled inline) or futures of bools

    def done(self) -> None:
        for p in self.parts:
            if isinstance(p, Future):
                p.exception()                       # waits; the error stays for result()

    def result(self) -> torch.Tensor | None:
        any_ok = [p.result() if isinstance(p, Future) else p for p in self.parts]
        return self.bitmask if any(any_ok) else None


def default_fill_threads() -> int:
    """Half the cores, at most 8 (one on a machine of two cores: threads would only contend there)."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


class StructuredOutputManager:
    """Compiles constraints (cached) and keeps one matcher per constrained sequence. ``fill_threads``: worker
    threads that advance matchers and fill bitmask rows each step (None: `default_fill_threads`)."""

    MIN_ROWS_PER_THREAD = 16

    def __init__(self, vocab_size: int, device: torch.device, max_workers: int = 2,
                 fill_threads: int | None = None):
        self.vocab_size = vocab_size
        self.device = device
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pagoda-grammar")
        self.fill_threads = default_fill_threads() if fill_threads is None else max(1, fill_threads)
        self.fill_pool: ThreadPoolExecutor | None = None   # created at the first fill that uses it
        self.inflight: PendingFill | None = None
        self._local = threading.local()             # one single-threaded BatchGrammarMatcher per thread
        self.compiler = None
        self.tokenizer_info = None
        self.stop_ids: frozenset[int] = frozenset()
        self.stop_row = None                            # int32 [cdiv(vocab, 32)]: only the stop tokens allowed
        self.cache: dict[tuple, Future] = {}
        self.lock = threading.Lock()
        self.matchers: dict[int, _Matcher] = {}        # seq_id -> its matcher
        self.bitmask = None                             # host int32 [rows, cdiv(vocab, 32)]

    def _init_compiler(self, tokenizer, eos_token_ids) -> None:
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=sorted(eos_token_ids) or None)
        self.tokenizer_info = info
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.stop_ids = frozenset(info.stop_token_ids)
        row = torch.zeros(xgr.get_bitmask_shape(1, self.vocab_size)[1], dtype=torch.int32)
        for t in self.stop_ids:
            row[t // 32] |= 1 << (t % 32) if t % 32 < 31 else -(1 << 31)
        self.stop_row = row

    def prepare(self, params, tokenizer, eos_token_ids) -> None:
        """Validate ``params.structured_outputs`` and start its compilation (or reuse the cached one); the
        future is kept on ``params`` (each request owns its params copy)."""
        so = params.structured_outputs
        grammar = build_grammar(so)
        with self.lock:
            if self.compiler is None:
                self._init_compiler(tokenizer, eos_token_ids)
            key = so.cache_key()
            fut = self.cache.get(key)
            if fut is None:
                fut = self.cache[key] = self.pool.submit(self.compiler.compile_grammar, grammar)
        params._compiled_grammar = fut

    def _matcher(self, seq) -> _Matcher:
        entry = self.matchers.get(seq.seq_id)
        if entry is None:
            xgr = _xgrammar()
            compiled = seq.params._compiled_grammar.result()
            entry = self.matchers[seq.seq_id] = _Matcher(xgr.GrammarMatcher(compiled))
        return entry

    def release(self, seq_id: int) -> None:
        self.wait()
        self.matchers.pop(seq_id, None)

    def _host_bitmask(self, num_rows: int) -> torch.Tensor:
        if self.bitmask is None or self.bitmask.shape[0] < num_rows:
            with torch.inference_mode(False):       # a normal tensor: the fill threads write it too
                mask = _xgrammar().allocate_token_bitmask(max(num_rows, 8), self.vocab_size)
                self.bitmask = mask.pin_memory() if self.device.type == "cuda" else mask
        return self.bitmask[:num_rows]

    def fill(self, num_rows: int, rows: list[tuple[int, object]],
             last_token: Callable[[object], int] | None = None) -> torch.Tensor | None:
        """Advance each constrained row's matcher with its output tokens not yet accepted and fill its bitmask
        row. ``rows``: ``(row, seq)``; ``last_token(seq)``: the sequence's token still on the device, read
        when ``seq.num_pending_tokens`` says there is one. Returns the host bitmask int32
        ``[num_rows, cdiv(vocab, 32)]`` (all bits set in unconstrained rows), or None when no row is
        constrained any more."""
        return self.start_fill(num_rows, rows, last_token, background=False).result()

    def start_fill(self, num_rows: int, rows: list[tuple[int, object]],
                   last_token: Callable[[object], int] | None = None, background: bool = True) -> PendingFill:
        """`fill`, with the matchers' work (C++, without the GIL) left running on the fill threads: the caller
        goes on with other host work and reads the mask with ``.result()``. What reads the sequences
        (their new tokens, pending ones through ``last_token``) runs here, in the caller's thread, so the
        sequences may change once this returns. One fill is in flight at a time: a new one (or `release`)
        waits for the previous one first."""
        self.wait()
        bitmask = self._host_bitmask(num_rows)
        items = []                                  # (row, seq, matcher, new output tokens)
        for row, seq in rows:
            entry = self._matcher(seq)
            if not entry.ok:
                continue
            new = seq.token_ids[seq.num_prompt_tokens + entry.consumed:]
            if getattr(seq, "num_pending_tokens", 0):
                new.append(last_token(seq))
            items.append((row, seq, entry, new))
        if len(items) < num_rows:
            bitmask.fill_(-1)                       # rows without a live matcher stay unconstrained
        if not items:
            return PendingFill(bitmask, [])
        chunks = self._chunks(items)
        if not background and len(chunks) == 1:
            return PendingFill(bitmask, [self._advance_and_fill(items, bitmask)])
        self.inflight = PendingFill(bitmask, [self._fill_pool().submit(self._advance_and_fill, c, bitmask)
                                              for c in chunks])
        return self.inflight

    def wait(self) -> None:
        """Wait for the fill in flight, if any (its errors are raised by whoever reads its result)."""
        fill, self.inflight = self.inflight, None
        if fill is not None:
            fill.done()

    def _fill_pool(self) -> ThreadPoolExecutor:
        if self.fill_pool is None:
            self.fill_pool = ThreadPoolExecutor(self.fill_threads, thread_name_prefix="pagoda-grammar-fill")
        return self.fill_pool

    def _chunks(self, items: list) -> list[list]:
        """``items`` in contiguous chunks, one per fill thread, each of at least `MIN_ROWS_PER_THREAD` rows."""
        n = min(self.fill_threads, len(items) // self.MIN_ROWS_PER_THREAD)
        if n <= 1:
            return [items]
        step = -(-len(items) // n)
        return [items[i:i + step] for i in range(0, len(items), step)]

    def _batch_matcher(self):
        """This thread's single-threaded ``xgrammar.BatchGrammarMatcher`` (the threads are ours)."""
        batch = getattr(self._local, "batch", None)
        if batch is None:
            batch = self._local.batch = _xgrammar().BatchGrammarMatcher(1)
        return batch

    def _advance_and_fill(self, items: list, bitmask: torch.Tensor) -> bool:
        """Accept each item's new tokens, then fill the bitmask rows of the matchers still constrained: all
        tokens of the grammar's next step, or only the stop tokens once one was accepted (the step was
        scheduled before it was read). A rejected token leaves the row unconstrained from then on. Returns
        whether a row is still constrained."""
        xgr = _xgrammar()
        todo = [(seq, entry, new) for _, seq, entry, new in items if new]
        k = 0
        while todo:                                 # round k: the k-th new token of every matcher that has one
            tokens = [new[k] for _, _, new in todo]
            accepted = xgr.BatchGrammarMatcher.batch_accept_token([e.matcher for _, e, _ in todo], tokens)
            left = []
            for (seq, entry, new), token, ok in zip(todo, tokens, accepted):
                entry.consumed += 1
                if not ok:
                    logger.warning("request %r: token %d rejected by its grammar; its output is no longer "
                                   "constrained", seq.request_id, token)
                    entry.ok = False
                    continue
                if token in self.stop_ids and entry.matcher.is_terminated():
                    entry.terminated = True
                if len(new) > k + 1:
                    left.append((seq, entry, new))
            todo, k = left, k + 1
        matchers, indices = [], []
        any_ok = False
        for row, _, entry, _ in items:
            if not entry.ok:
                bitmask[row].fill_(-1)
            elif entry.terminated:
                bitmask[row].copy_(self.stop_row)
                any_ok = True
            else:
                matchers.append(entry.matcher)
                indices.append(row)
        if matchers:
            self._batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, indices)
            any_ok = True
        return any_ok

    def apply(self, logits: torch.Tensor, host_mask: torch.Tensor) -> None:
        """Copy the filled mask to the device and set the forbidden logits to -inf there."""
        xgr = _xgrammar()
        mask = host_mask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size)

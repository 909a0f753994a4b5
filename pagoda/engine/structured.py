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

The matcher must see every sampled token before the next mask is filled, so a constrained row whose last
token is still on the device (the engine reading tokens one step behind) costs one synchronisation to read it.
Optional dependency: ``pip install 'pagoda[structured]'``.
"""
from __future__ import annotations

import json
import logging
import threading
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


class StructuredOutputManager:
    """Compiles constraints (cached) and keeps one matcher per constrained sequence."""

    def __init__(self, vocab_size: int, device: torch.device, max_workers: int = 2):
        self.vocab_size = vocab_size
        self.device = device
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pagoda-grammar")
        self.compiler = None
        self.tokenizer_info = None
        self.cache: dict[tuple, Future] = {}
        self.lock = threading.Lock()
        self.matchers: dict[int, list] = {}            # seq_id -> [matcher, tokens consumed, ok]
        self.bitmask = None                             # host int32 [rows, cdiv(vocab, 32)]

    def _init_compiler(self, tokenizer, eos_token_ids) -> None:
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=sorted(eos_token_ids) or None)
        self.tokenizer_info = info
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)

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

    def _matcher(self, seq):
        entry = self.matchers.get(seq.seq_id)
        if entry is None:
            xgr = _xgrammar()
            compiled = seq.params._compiled_grammar.result()
            entry = self.matchers[seq.seq_id] = [xgr.GrammarMatcher(compiled), 0, True]
        return entry

    def release(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)

    def fill(self, num_rows: int, rows: list[tuple[int, object, list[int]]]) -> torch.Tensor | None:
        """Advance each constrained row's matcher with its new output tokens and fill its bitmask row.
        ``rows``: ``(row, seq, output_token_ids)``. Returns the host bitmask ``[num_rows, cdiv(vocab, 32)]``
        (all bits set in unconstrained rows), or None when no row is constrained any more."""
        xgr = _xgrammar()
        if self.bitmask is None or self.bitmask.shape[0] < num_rows:
            mask = xgr.allocate_token_bitmask(max(num_rows, 8), self.vocab_size)
            self.bitmask = mask.pin_memory() if self.device.type == "cuda" else mask
        bitmask = self.bitmask[:num_rows]
        bitmask.fill_(-1)
        any_ok = False
        for row, seq, out in rows:
            entry = self._matcher(seq)
            matcher = entry[0]
            while entry[2] and entry[1] < len(out):
                if not matcher.accept_token(out[entry[1]]):
                    logger.warning("request %r: token %d rejected by its grammar; its output is no longer "
                                   "constrained", seq.request_id, out[entry[1]])
                    entry[2] = False
                entry[1] += 1
            if entry[2] and matcher.is_terminated():
                # The stop token was accepted (the step was scheduled before it was read): only stop tokens.
                bitmask[row].zero_()
                for t in self.tokenizer_info.stop_token_ids:
                    bitmask[row, t // 32] |= 1 << (t % 32) if t % 32 < 31 else -(1 << 31)
                any_ok = True
            elif entry[2]:
                matcher.fill_next_token_bitmask(bitmask, row)
                any_ok = True
        return bitmask if any_ok else None

    def apply(self, logits: torch.Tensor, host_mask: torch.Tensor) -> None:
        """Copy the filled mask to the device and set the forbidden logits to -inf there."""
        xgr = _xgrammar()
        mask = host_mask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size)

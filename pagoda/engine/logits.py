"""Logits processing between the LM head and the sampler.

A processor is ``processor(logits, seqs) -> logits``: ``logits`` float32 ``[num_sampling_seqs, vocab]``
on the device (row i belongs to ``seqs[i]``), edited in place or replaced. `ModelRunner.logits_processors`
runs them in order each step. `LogitsPipeline` is the engine's one processor: it holds the persistent batch
(a slot per sampling sequence, kept while the sequence lives) and applies, in this order,

1. structured output: the grammar bitmask of constrained rows, filled on the host (`pagoda.engine.structured`);
2. per-request Python callables (``SamplingParams.logits_processors``);
3. the batch-level processors registered with ``LLM(logits_processors=[cls])`` (`pagoda.engine.logits_processors`);
4. the built-in processing in one kernel: allowed tokens and logit bias, bad words, min_tokens, then the
   repetition / frequency / presence penalties (`pagoda.engine.logits_processors_builtin`, vLLM's semantics).

After sampling, `LogitsPipeline.on_sampled` updates the device state (output counts, lengths, last tokens)
from the sampled token tensor, with no host read. Requests whose params use none of this pay one
host-side pass over the batch and no kernel.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from pagoda.engine.logits_processors import BatchUpdate, OutputTokenIds, apply_per_request, check_callable
from pagoda.engine.logits_processors_builtin import BuiltinLogitsState
from pagoda.engine.sequence import Sequence

LogitsProcessor = Callable[[torch.Tensor, list[Sequence]], torch.Tensor]


def _to_device(values: list[int], device: torch.device, dtype=torch.int64) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


def min_tokens_processor(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Forbid EOS and stop_token_ids while a sequence has fewer than ``min_tokens`` output tokens (host-side
    form; the engine uses `LogitsPipeline`, which does this on the device)."""
    rows: list[int] = []
    cols: list[int] = []
    for i, seq in enumerate(seqs):
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            continue
        stops = [t for t in set(params.stop_token_ids) | set(seq.eos_token_ids) if t < logits.shape[1]]
        rows += [i] * len(stops)
        cols += stops
    if rows:
        # (a device-side value: item assignment of a Python number would copy a CPU scalar over, a sync)
        logits.index_put_((_to_device(rows, logits.device), _to_device(cols, logits.device)),
                          logits.new_full((), float("-inf")))
    return logits


def bad_words_token_ids(bad_words: list[str], tokenizer, vocab_size: int) -> list[list[int]]:
    """vLLM's tokenization of bad words: each word as written (leading spaces stripped) and with one leading
    space, the latter kept when it is a different word of the same length. ValueError for a word that encodes
    to nothing or to ids outside the vocabulary."""
    out: list[list[int]] = []
    for word in bad_words:
        for prefix_space in (False, True):
            ids = tokenizer.encode((" " if prefix_space else "") + word.lstrip(), add_special_tokens=False)
            if not ids:
                if not prefix_space:
                    raise ValueError(f"bad_words entry {word!r} encodes to no token")
                continue
            if not prefix_space or (ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(list(ids))
    bad = [t for w in out for t in w if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"bad_words encode to token ids outside the vocabulary [0, {vocab_size}): {bad[:8]}")
    return out


class LogitsPipeline:
    """The engine's logits processing (see the module docstring). ``config``: the `EngineConfig`
    (``config.logits_processors``: batch-level processor classes)."""

    def __init__(self, config, device: torch.device, vocab_size: int):
        self.device = device
        self.vocab_size = vocab_size
        capacity = getattr(config, "max_num_seqs", 256)
        self.builtin = BuiltinLogitsState(vocab_size, device, capacity)
        pin = device.type == "cuda"
        self.custom = [cls(config, device, pin) for cls in (getattr(config, "logits_processors", None) or ())]
        self.structured = None                   # StructuredOutputManager, created by the first constrained request
        self.slot_of: dict[int, int] = {}        # seq_id -> slot
        self.holders: dict[int, tuple[int, weakref.ref]] = {}  # slot -> (seq_id, the sequence holding it)
        self.free: list[int] = []
        self.next_slot = 0
        self.last_sampled = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self._removed: list[int] = []
        self._added: list[tuple] = []
        self._row_slots: torch.Tensor | None = None
        self._started = None                      # (seqs, PendingFill): a grammar fill begun by begin_sampling

    # -- add_request ---------------------------------------------------------------------------------------
    def prepare(self, params, tokenizer, eos_token_ids) -> None:
        """Check what depends on the model (ids inside the vocabulary, bad words, the grammar) and keep
        what the request needs on ``params`` (the engine's own copy). ValueError names what is wrong."""
        V = self.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids),
                          ("logit_bias", list(params.logit_bias or ()))):
            bad = [t for t in ids or () if not 0 <= t < V]
            if bad:
                raise ValueError(f"{name} has token ids outside the vocabulary [0, {V}): {bad[:8]}")
        params._bad_words_token_ids = bad_words_token_ids(params.bad_words, tokenizer, V) if params.bad_words else []
        for fn in params.logits_processors or ():
            check_callable(fn)
        for proc in self.custom:
            proc.validate_params(params)
        if params.structured_outputs is not None:
            if self.structured is None:
                from pagoda.engine.structured import StructuredOutputManager
                self.structured = StructuredOutputManager(V, self.device)
            self.structured.prepare(params, tokenizer, eos_token_ids)

    # -- the persistent batch ------------------------------------------------------------------------------
    def _release_finished(self) -> None:
        for slot, (seq_id, ref) in list(self.holders.items()):
            seq = ref()
            if seq is not None and not seq.is_finished:
                continue
            del self.holders[slot]
            self.slot_of.pop(seq_id, None)
            if self.structured is not None:
                self.structured.release(seq_id)
            self.builtin.remove_seq(slot)
            self.free.append(slot)
            if self.custom:
                self._removed.append(slot)

    def _join(self, seq: Sequence) -> int:
        if self.free:
            self.free.sort(reverse=True)
            slot = self.free.pop()             # the lowest free slot: the batch stays compact
        else:
            slot = self.next_slot
            self.next_slot += 1
            if slot >= self.builtin.capacity:
                cap = 2 * self.builtin.capacity
                self.builtin.grow(cap)
                self.last_sampled = torch.cat([self.last_sampled, self.last_sampled.new_full(
                    (cap - self.last_sampled.shape[0],), -1)])
        self.slot_of[seq.seq_id] = slot
        self.holders[slot] = (seq.seq_id, weakref.ref(seq))
        self.builtin.add_seq(slot, seq, getattr(seq.params, "_bad_words_token_ids", None) or [])
        if self.custom:
            self._added.append((slot, seq.params, seq.token_ids[:seq.num_prompt_tokens], OutputTokenIds(seq)))
        return slot

    @property
    def batch_size(self) -> int:
        return max(self.holders, default=-1) + 1

    def _pending_token(self, seq: Sequence) -> int:
        """The sequence's sampled token still on the device (read from it: a synchronisation)."""
        return int(self.last_sampled[self.slot_of[seq.seq_id]])

    def _outputs(self, seq: Sequence) -> list[int]:
        """The output token ids including one still on the device (read from it: a synchronisation)."""
        out = seq.output_token_ids
        if getattr(seq, "num_pending_tokens", 0):
            out.append(self._pending_token(seq))
        return out

    # -- each step -----------------------------------------------------------------------------------------
    def is_active(self, seqs: list[Sequence]) -> bool:
        """Whether this batch needs the pipeline: a registered batch-level processor, or a sequence with
        penalties, bias, allowed tokens, bad words, a grammar, callables, or min_tokens not yet reached."""
        if self.custom:
            return True
        for s in seqs:
            p = s.params
            if (p.has_penalties or p.logit_bias or p.allowed_token_ids is not None or p.bad_words
                    or p.structured_outputs is not None or p.logits_processors):
                return True
            if s.num_output_tokens + getattr(s, "num_pending_tokens", 0) < p.min_tokens:
                return True
        return False

    def needs_host_tokens(self, seqs: list[Sequence]) -> bool:
        """Whether this batch's processing reads output tokens on the host (grammars, Python callables,
        batch-level processors unless they say ``reads_output_token_ids = False``); the built-in processing
        alone keeps its state on the device."""
        return (any(getattr(p, "reads_output_token_ids", True) for p in self.custom)
                or any(s.params.structured_outputs is not None or s.params.logits_processors for s in seqs))

    def begin_sampling(self, seqs: list[Sequence], token_of: dict[int, int]) -> None:
        """Start the host work of sampling ``seqs`` that needs the tokens just read: the grammar matchers
        advance and fill the bitmask on their threads while the engine turns those tokens into outputs;
        `__call__` on the same ``seqs`` list takes the mask. ``token_of``: seq_id -> the token read for
        sequences whose last token is still counted pending."""
        constrained = [(i, s) for i, s in enumerate(seqs) if s.params.structured_outputs is not None]
        if not constrained or self.structured is None:
            return
        last = lambda seq: token_of[seq.seq_id] if seq.seq_id in token_of else self._pending_token(seq)  # noqa: E731
        self._started = (seqs, self.structured.start_fill(len(seqs), constrained, last))

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        self._release_finished()                    # (release waits for a grammar fill in flight)
        slots = [self.slot_of.get(s.seq_id) for s in seqs]
        for i, seq in enumerate(seqs):
            if slots[i] is None:
                slots[i] = self._join(seq)
        for i, seq in enumerate(seqs):
            # min_tokens reached (tokens still on the device counted): its bans end for good, so that steps
            # which skip the pipeline later cannot leave a stale count behind.
            if (seq.params.min_tokens and "stop" in self.builtin.slot_groups.get(slots[i], ())
                    and seq.num_output_tokens + getattr(seq, "num_pending_tokens", 0) >= seq.params.min_tokens):
                self.builtin.drop_group(slots[i], "stop")
        self._row_slots = row_slots = _to_device(slots, self.device, torch.int32)
        started, self._started = self._started, None
        if started is not None and started[0] is seqs:
            mask = started[1].result()
        else:
            constrained = [(i, s) for i, s in enumerate(seqs) if s.params.structured_outputs is not None]
            mask = self.structured.fill(len(seqs), constrained, self._pending_token) if constrained else None
        if mask is not None:
            self.structured.apply(logits, mask)
        callables = [(i, s, self._outputs(s)) for i, s in enumerate(seqs) if s.params.logits_processors]
        if callables:
            logits = apply_per_request(logits, callables)
        if self.custom:
            logits = self._apply_custom(logits, seqs, slots, row_slots)
        return self.builtin.apply(logits, row_slots)

    def _apply_custom(self, logits: torch.Tensor, seqs: list[Sequence], slots: list[int],
                      row_slots: torch.Tensor) -> torch.Tensor:
        update = None
        if self._removed or self._added:
            update = BatchUpdate(self.batch_size, list(self._removed), list(self._added), [])
        self._removed, self._added = [], []
        all_greedy = all(s.params.is_greedy for s in seqs)
        active = [p for p in self.custom if not (all_greedy and p.is_argmax_invariant())]
        for proc in self.custom:
            proc.update_state(update)
        if not active:
            return logits
        # The processors see the persistent batch: row i is slot i (filler rows for slots not sampling now).
        # When the step's rows are the persistent batch in order, the logits are that batch already.
        if slots == list(range(self.batch_size)):
            for proc in active:
                logits = proc.apply(logits)
            return logits
        idx = row_slots.long()
        view = logits.new_zeros(self.batch_size, logits.shape[1])
        view.index_copy_(0, idx, logits)
        for proc in active:
            view = proc.apply(view)
        return view.index_select(0, idx)

    def on_sampled(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Record the step's sampled tokens (int64 ``[len(seqs)]`` on the device) in the device state."""
        if self._row_slots is None or not seqs:
            return
        row_slots = self._row_slots
        self.last_sampled.index_copy_(0, row_slots.long(), tokens.long())
        self.builtin.on_sampled(row_slots, tokens)
        self._row_slots = None

"""Continuous batching: which sequences run in the next step, and how many tokens of each.

Every step fills a budget of ``max_num_batched_tokens`` tokens: first one token for each running
sequence that is decoding, then chunks of the running sequences still prefilling, then new (or
preempted) sequences from the waiting queue, first come first served, up to ``max_num_seqs`` running.
A prompt longer than what is left of the budget is prefilled in chunks over several steps (chunked
prefill), sharing each step with the decodes. When pages run out, the most recently admitted running
sequence is preempted: its pages are released (its full blocks stay in the prefix cache) and it goes
back to the front of the waiting queue, to be recomputed later; its outputs do not change.

The engine reads each step's sampled tokens one step behind (`Sequence.num_pending_tokens`): a sequence
whose token is still on the device decodes it next (its KV slot and position are known, its id is read
from device memory), and one whose pending tokens already reach ``max_tokens`` is not scheduled again
(it finishes when they are read).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from pagoda.engine.block_manager import BlockManager
from pagoda.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` computes the KV of its next ``num_new_tokens[i]`` tokens (from
    ``num_computed_tokens``); the sequences whose last token is among them sample a new token."""
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        scheduled: set[int] = set()
        budget = self.max_num_batched_tokens
        preempted = False
        # Running sequences: decodes first (one token each), then the chunks of unfinished prefills (in the
        # order they run; a decode's allocation may have preempted some of them meanwhile).
        prefills: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            remaining = seq.num_tokens + seq.num_pending_tokens - seq.num_computed_tokens
            if remaining != 1:
                if remaining > 1:
                    prefills.append(seq)
                continue
            if self.finishes_when_read(seq):
                continue
            if not self._allocate_or_preempt(seq, 1, scheduled):
                preempted = True
                continue
            batch.seqs.append(seq)
            batch.num_new_tokens.append(1)
            scheduled.add(seq.seq_id)
            budget -= 1
        for seq in prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or self.finishes_when_read(seq):
                continue
            remaining = seq.num_tokens + seq.num_pending_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            if n < remaining and not self.enable_chunked_prefill:
                continue
            if not self._allocate_or_preempt(seq, n, scheduled):
                preempted = True
                continue
            if seq.status is not SequenceStatus.RUNNING:   # it preempted itself
                preempted = True
                continue
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            scheduled.add(seq.seq_id)
            budget -= n
        # Waiting sequences, unless pages just ran out (admitting one would only preempt it again).
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens:    # preempted with a token not yet read: admitted once it is
                break
            hits = self.block_manager.get_computed_blocks(seq)
            remaining = seq.num_tokens - len(hits) * self.block_manager.block_size
            n = min(remaining, budget)
            if n < remaining and not self.enable_chunked_prefill:
                break
            if not self.block_manager.allocate_slots(seq, n, hits):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            scheduled.add(seq.seq_id)
            budget -= n
        return batch

    @staticmethod
    def finishes_when_read(seq: Sequence) -> bool:
        """True when the tokens sampled for ``seq`` but not yet read already make ``max_tokens``: it finishes
        (by length, or earlier by a stop) when they are read, so a further step would be wasted."""
        return seq.num_pending_tokens > 0 and seq.num_output_tokens + seq.num_pending_tokens >= seq.max_tokens

    def _allocate_or_preempt(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Pages for ``n`` more tokens of ``seq``, preempting the latest admitted sequence not yet in this
        step while they are short. Returns False when ``seq`` itself had to be preempted."""
        while not self.block_manager.allocate_slots(seq, n):
            victim = next((s for s in reversed(self.running) if s is not seq and s.seq_id not in scheduled), None)
            if victim is None:
                self.preempt(seq)
                return False
            self.preempt(victim)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Release ``seq``'s pages; it is recomputed when next admitted (outputs unchanged)."""
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted %r (KV usage %.1f%%)", seq, 100 * self.block_manager.usage)

    def update_after_step(self, batch: ScheduledBatch) -> None:
        """The step (launched) computes the scheduled tokens' KV: count them and register the blocks they
        filled whose tokens are known (the rest once the pending tokens are read: `cache_blocks`)."""
        cache = self.block_manager.cache_full_blocks
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            # A step whose last input is a token not yet read (a decode, one step behind) completes no block
            # whose tokens are known beyond what `cache_blocks` registered when that token's step was read.
            if seq.num_computed_tokens <= seq.num_tokens:
                cache(seq)

    def cache_blocks(self, seqs: list[Sequence]) -> None:
        """Register the full blocks of running ``seqs`` completed by tokens just read back."""
        for seq in seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_full_blocks(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and release its pages."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED

"""The model runner under tensor parallelism: rank 0 drives, every other rank replays its steps.

Rank 0 runs the whole engine (scheduler, block manager, sampling). Before it launches a step it
broadcasts a small message (`StepSender`): for each scheduled sequence its id, how many tokens it
computes from where, the token ids among them that the host knows, and the part of its page table
that the other ranks have not seen yet (page tables only grow, except after a preemption, when the
whole table is sent again). Every other rank rebuilds the step from it (`StepMirror`) and calls the
same `ModelRunner.launch`, so each rank builds the same inputs and the same attention plan and runs
the same collectives in the same order. After sampling, rank 0 broadcasts the sampled token ids
(a device tensor, int64 ``[S]``): the next step's pending inputs are read from device memory on
every rank, as at one process, so the one-step-ahead schedule and the decode CUDA graphs (whose
all-reduces are captured with them) work unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pagoda.engine.block_table import BlockTable
from pagoda.engine.config import EngineConfig
from pagoda.engine.distributed import ParallelState, broadcast_object, min_across_ranks
from pagoda.engine.model_runner import InFlightStep, LaunchedStep, ModelRunner
from pagoda.engine.scheduler import ScheduledBatch


class ShardedModelRunner(ModelRunner):
    """A `ModelRunner` over this rank's shard of the model (the layers read the rank from
    `torch.distributed`). The KV-cache size is the smallest any rank can hold, so that the ranks'
    page ids mean the same pages."""

    def __init__(self, config: EngineConfig, state: ParallelState):
        self.parallel = state
        super().__init__(config)

    def _num_blocks(self) -> int:
        return min_across_ranks(super()._num_blocks())

    def sample(self, step: LaunchedStep) -> InFlightStep | None:
        """Rank 0 samples (its logits cover the vocabulary); the others only run the forward passes (the
        memory profile's pass included)."""
        return super().sample(step) if self.parallel.is_driver else None


class DriverModelRunner(ShardedModelRunner):
    """Rank 0's runner: each `launch` first broadcasts the step to the other ranks, each `sample`
    broadcasts its tokens after them. Start-up passes (memory profile, graph capture) run on every rank
    at once and are not broadcast."""

    def __init__(self, config: EngineConfig, state: ParallelState):
        self._driving = False
        self._sender = StepSender(config.block_size)
        super().__init__(config, state)
        self._driving = True

    def launch(self, batch: ScheduledBatch, prev: InFlightStep | None = None) -> LaunchedStep:
        if self._driving:
            broadcast_object(self.parallel, ("step", self._sender.message(batch, prev is not None)))
        return super().launch(batch, prev)

    def sample(self, step: LaunchedStep) -> InFlightStep | None:
        out = super().sample(step)
        if self._driving and out is not None:
            if out.tokens.dtype != torch.int64:    # the other ranks receive into int64
                raise TypeError(f"sampled tokens must be int64 to be broadcast, got {out.tokens.dtype}")
            dist.broadcast(out.tokens, src=0)
        return out


class StepSender:
    """Rank 0's side of the step messages (see the module docstring).

    A message is ``(has_prev, entries, dropped)``: ``has_prev`` whether the step reads pending tokens
    of the previous step; one entry per scheduled sequence, ``(seq_id, num_new_tokens,
    num_computed_tokens, num_tokens, num_pending_tokens, known_new_token_ids, kept_pages, new_pages)``
    (the page table is the first ``kept_pages`` pages the ranks hold, then ``new_pages``); ``dropped``
    the ids of finished sequences the ranks may forget."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._sent: dict[int, tuple[object, list[int]]] = {}   # seq_id -> (sequence, page table the ranks hold)

    def message(self, batch: ScheduledBatch, has_prev: bool) -> tuple:
        bs = self.block_size
        entries = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, known = seq.num_computed_tokens, seq.num_tokens
            end = start + n
            table = seq.block_table[:-(-end // bs)]
            held = self._sent.get(seq.seq_id)
            keep = 0
            if held is not None and len(held[1]) <= len(table) and table[:len(held[1])] == held[1]:
                keep = len(held[1])
            self._sent[seq.seq_id] = (seq, table)
            entries.append((seq.seq_id, n, start, known, seq.num_pending_tokens, seq.token_ids[start:min(end, known)],
                            keep, table[keep:]))
        dropped = [sid for sid, (seq, _) in self._sent.items() if seq.is_finished]
        for sid in dropped:
            del self._sent[sid]
        return has_prev, entries, dropped


class _TokenWindow:
    """The token ids a step needs of a sequence, indexed as the whole ``token_ids`` list."""

    __slots__ = ("offset", "ids")

    def __init__(self, offset: int, ids: list[int]):
        self.offset, self.ids = offset, ids

    def __getitem__(self, s: slice) -> list[int]:
        if not isinstance(s, slice) or s.step is not None or s.start < self.offset \
                or s.stop > self.offset + len(self.ids):
            raise IndexError(f"tokens {s} are outside what rank 0 sent ({self.offset}..{self.offset + len(self.ids)})")
        return self.ids[s.start - self.offset:s.stop - self.offset]


class MirrorSequence:
    """What a non-driving rank knows of a sequence: what `ModelRunner.launch` reads."""

    __slots__ = ("seq_id", "num_computed_tokens", "num_tokens", "num_pending_tokens", "token_ids", "block_table")

    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.block_table = BlockTable()

    @property
    def is_prefill(self) -> bool:
        return self.num_tokens - self.num_computed_tokens > 1

    def __repr__(self) -> str:
        return f"MirrorSequence({self.seq_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens})"


class StepMirror:
    """A non-driving rank's side: rebuilds rank 0's `ScheduledBatch` from a step message."""

    def __init__(self):
        self.seqs: dict[int, MirrorSequence] = {}

    def apply(self, message: tuple) -> tuple[ScheduledBatch, bool]:
        """``message`` -> (the step's batch of mirror sequences, whether it reads the previous step's tokens)."""
        has_prev, entries, dropped = message
        for sid in dropped:
            self.seqs.pop(sid, None)
        batch = ScheduledBatch()
        for sid, n, start, known, pending, ids, keep, pages in entries:
            seq = self.seqs.get(sid)
            if seq is None:
                seq = self.seqs[sid] = MirrorSequence(sid)
            seq.num_computed_tokens, seq.num_tokens, seq.num_pending_tokens = start, known, pending
            seq.token_ids = _TokenWindow(start, ids)
            if len(seq.block_table) < keep:
                raise RuntimeError(f"rank 0 keeps {keep} pages of sequence {sid}, this rank holds "
                                   f"{len(seq.block_table)}")
            seq.block_table.truncate(keep)
            seq.block_table.extend(pages)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
        return batch, has_prev


def replay_step(runner: ModelRunner, mirror: StepMirror, message: tuple, prev: InFlightStep | None
                ) -> InFlightStep | None:
    """Run rank 0's step ``message`` on this rank: the forward pass (with its collectives), then receive
    the tokens rank 0 sampled. Returns what the next step reads its pending tokens from (None when
    no sequence sampled)."""
    batch, has_prev = mirror.apply(message)
    if has_prev and prev is None:
        raise RuntimeError("rank 0's step reads the previous step's tokens, which this rank never received")
    launched = runner.launch(batch, prev if has_prev else None)
    if not launched.seqs:
        return None
    tokens = torch.empty(len(launched.seqs), dtype=torch.int64, device=runner.device)
    dist.broadcast(tokens, src=0)
    return InFlightStep(launched.seqs, tokens, {s.seq_id: i for i, s in enumerate(launched.seqs)}, tokens)

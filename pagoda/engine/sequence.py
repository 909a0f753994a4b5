"""`Sequence`: one completion being generated (a request with n > 1 has n of them), and its state in the
scheduler and the KV cache."""
from __future__ import annotations

import enum
import itertools

import torch

from pagoda.engine.block_table import BlockTable
from pagoda.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()    # no KV pages (new, or preempted: its tokens are recomputed)
    RUNNING = enum.auto()    # holds pages; prefilling in chunks or decoding
    FINISHED = enum.auto()


_ids = itertools.count()     # process-wide sequence ids (only compared for identity and ordering)


class Sequence:
    """Token ids (prompt then output), how many of them have their KV in the cache
    (``num_computed_tokens``), the pages holding them (``block_table``) and the output state.

    The last sampled token has no KV yet: a decode step computes it and samples the next one. After a
    preemption ``num_computed_tokens`` is 0 and the whole sequence is prefilled again (outputs unchanged:
    the output tokens stay and the next sample continues from them).
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, eos_token_ids: frozenset[int], generator: torch.Generator | None,
                 arrival: float):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.generator = generator
        self.arrival = arrival
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0          # prompt tokens found in the prefix cache at first schedule
        # Tokens sampled on the device but not yet read back (the engine reads each step's tokens one step
        # behind): they follow token_ids, and the next step's inputs take them from device memory.
        self.num_pending_tokens = 0
        self.block_table = BlockTable()
        self.block_hashes: list[int] = []   # hashes of the leading full blocks already registered
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.detokenizer = None             # set by the engine (IncrementalDetokenizer)
        # What the previous DELTA output already carried.
        self.sent_tokens = 0
        self.sent_text = 0
        self.final_sent = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """True while more than one token lacks its KV (a prompt, or a preempted sequence's recompute)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")

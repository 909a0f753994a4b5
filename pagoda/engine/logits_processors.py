"""User logits processors, in two forms.

**Batch-level** (vLLM v1's interface, same class and method names): subclass `LogitsProcessor` and register
the class, ``LLM(model, logits_processors=[MyProcessor])``. The engine builds one instance,
``MyProcessor(engine_config, device, is_pin_memory)`` (pagoda's `EngineConfig` where vLLM passes its
``VllmConfig``), calls ``update_state(batch_update)`` before each sampling step (a `BatchUpdate` when requests
joined or left the persistent batch since the last call, else None) and ``apply(logits)`` on the whole batch:
``logits`` float32 ``[batch_size, vocab]`` on the device, row ``i`` the request at persistent index ``i``.
Written with tensor ops over state kept in device tensors, a processor costs a few kernel launches and no
host synchronisation, so it can run inside a captured CUDA graph.

Differences from vLLM: a request joins the batch when it first samples (vLLM: when first scheduled); indices
are never compacted (no ``moved`` entries: a leaving request leaves a hole, refilled by the next to join), so
``batch_size`` is one past the highest index in use and rows of absent or non-sampling requests are filler
whose results are dropped; ``output_tok_ids`` is a live view of the output tokens read back so far, which is
all of them unless the processor sets ``reads_output_token_ids = False`` (then the engine overlaps steps, and
the token of the step before is still on the device when the processor runs). Argmax-invariant processors are skipped in
steps where every row decodes greedily (vLLM applies them after temperature; pagoda applies them before,
which an argmax-invariant processor should not notice). Processors run after the structured-output mask and
before the built-in penalties, bias and bans.

**Per request** (vLLM's earlier interface): ``SamplingParams(logits_processors=[fn])`` with
``fn(output_token_ids, logits) -> logits`` or ``fn(prompt_token_ids, output_token_ids, logits) -> logits``,
``logits`` the request's float32 ``[vocab]`` row. These run in Python, one call per row per step, outside any
graph, and make the engine read each step's tokens before sampling the next (no overlap of host and device
for that batch). Cost per row per step, measured on the CPU (one thread, 32k vocabulary,
``tests/engine/test_logits_processors.py::test_per_request_cost``): about 5 µs for a no-op callable and 10 µs
for one that sets one logit; on a GPU each tensor op of a callable is also a kernel launch per row, so a
batch of 256 rows pays 256 launches per op per step (milliseconds), where a batch-level processor pays one.
"""
from __future__ import annotations

import inspect
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto

import torch


class MoveDirectionality(Enum):
    UNIDIRECTIONAL = auto()
    SWAP = auto()


RemovedRequest = int
AddedRequest = tuple  # (index, params, prompt_tok_ids, output_tok_ids)
MovedRequest = tuple  # (index 1, index 2, MoveDirectionality); pagoda never moves requests


@dataclass(frozen=True)
class BatchUpdate:
    """Changes to the persistent batch since the previous step: process ``removed``, then ``added``, then
    ``moved``. ``batch_size``: rows of the logits ``apply`` receives."""
    batch_size: int
    removed: Sequence[RemovedRequest]
    added: Sequence[AddedRequest]
    moved: Sequence[MovedRequest]


class LogitsProcessor(ABC):
    #: pagoda's addition: False declares that ``apply`` and ``update_state`` never read the ``output_tok_ids``
    #: of `BatchUpdate.added` (the processor keeps what it needs in its own device tensors, or needs nothing of
    #: the output). The engine then samples right behind the forward pass and reads the tokens one step later,
    #: overlapping its host work with the device's; with True (the default) it reads each step's tokens before
    #: sampling the next, so that those lists are whole when the processor runs.
    reads_output_token_ids: bool = True

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Raise ValueError for sampling params this processor cannot serve (called at add_request)."""
        return None

    @abstractmethod
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        raise NotImplementedError

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Edit ``logits [batch_size, vocab]`` (in place or not) and return the result."""
        raise NotImplementedError

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True when the processor never changes which token has the largest logit."""
        raise NotImplementedError

    @abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Called before each step; ``batch_update`` is None when no request joined or left."""
        raise NotImplementedError


class OutputTokenIds(Sequence):
    """Live, read-only view of a sequence's output token ids (what the engine has read back so far)."""

    def __init__(self, seq):
        self._seq = weakref.ref(seq)

    def _ids(self) -> list[int]:
        seq = self._seq()
        return [] if seq is None else seq.token_ids[seq.num_prompt_tokens:]

    def __len__(self) -> int:
        seq = self._seq()
        return 0 if seq is None else seq.num_output_tokens

    def __getitem__(self, i):
        return self._ids()[i]

    def __iter__(self):
        return iter(self._ids())

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"OutputTokenIds({self._ids()})"


_ARITY: dict[int, tuple[Callable, int]] = {}


def _arity(fn: Callable) -> int:
    """2 or 3 positional parameters (cached by identity: signature inspection costs ~10 µs)."""
    hit = _ARITY.get(id(fn))
    if hit is not None and hit[0] is fn:
        return hit[1]
    n = _inspect_arity(fn)
    if len(_ARITY) > 4096:
        _ARITY.clear()
    _ARITY[id(fn)] = (fn, n)
    return n


def _inspect_arity(fn: Callable) -> int:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return 2
    return 3 if len(params) >= 3 else 2


def check_callable(fn: Callable) -> None:
    """A per-request processor takes 2 or 3 positional arguments (TypeError otherwise)."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return
    if len(params) not in (2, 3) and not any(p.kind is p.VAR_POSITIONAL for p in
                                              inspect.signature(fn).parameters.values()):
        raise TypeError(f"logits_processors: {fn!r} must take (output_token_ids, logits) or "
                        f"(prompt_token_ids, output_token_ids, logits)")


def apply_per_request(logits: torch.Tensor, rows: list[tuple[int, object, list[int]]]) -> torch.Tensor:
    """Run per-request callables: ``rows`` lists ``(row, seq, output_token_ids)`` of rows that have any."""
    for row, seq, output_ids in rows:
        prompt = None
        for fn in seq.params.logits_processors:
            if _arity(fn) == 3:
                if prompt is None:
                    prompt = seq.token_ids[:seq.num_prompt_tokens]
                new = fn(prompt, output_ids, logits[row])
            else:
                new = fn(output_ids, logits[row])
            if new is not None and new.data_ptr() != logits[row].data_ptr():
                logits[row] = new
    return logits

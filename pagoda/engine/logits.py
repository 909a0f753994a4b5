"""Logits processing between the LM head and the sampler.

A processor is ``processor(logits, seqs) -> logits``: ``logits`` float32 ``[num_sampling_seqs, vocab]``
on the device (row i belongs to ``seqs[i]``), edited in place or replaced, never read back to the host.
`ModelRunner.logits_processors` runs them in order each step; penalties, logit bias, allowed tokens
and grammar masks belong here, as batch-level processors like vLLM's.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pagoda.engine.sequence import Sequence

LogitsProcessor = Callable[[torch.Tensor, list[Sequence]], torch.Tensor]


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


def min_tokens_processor(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Forbid the tokens that would stop a sequence (EOS unless ignore_eos, and stop_token_ids) while it
    has fewer than ``min_tokens`` output tokens, as vLLM does: -inf logits, so they cannot be sampled."""
    rows: list[int] = []
    cols: list[int] = []
    for i, seq in enumerate(seqs):
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            continue
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= seq.eos_token_ids
        stops = [t for t in stops if t < logits.shape[1]]
        rows += [i] * len(stops)
        cols += stops
    if rows:
        logits[_to_device(rows, logits.device), _to_device(cols, logits.device)] = float("-inf")
    return logits

"""Sequences without a model, for the block manager and scheduler tests."""
from __future__ import annotations

from pagoda.engine import SamplingParams
from pagoda.engine.sequence import Sequence


def make_seq(tokens: list[int], max_tokens: int = 8, rid: str = "r") -> Sequence:
    return Sequence(rid, 0, tokens, SamplingParams(max_tokens=max_tokens), max_tokens, frozenset(), None, 0.0)

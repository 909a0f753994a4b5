"""The engine's sampler (`pagoda.engine.sampler.sample`) on fixed logits: each path draws from the law its
parameters give (many rows of the same logits), greedy rows take the argmax, and a seeded row's token does not
depend on the rows beside it."""
from __future__ import annotations

import torch

from pagoda.engine import SamplingParams
from pagoda.engine.sampler import sample
from pagoda.engine.sequence import Sequence
from tests.ops.sampling_laws import assert_law

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, -0.5])


def _seq(params: SamplingParams, seed: int | None = None) -> Sequence:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return Sequence("r", 0, [1, 2], params, 8, frozenset(), gen, 0.0)


def _draw(params: SamplingParams, n: int = 20000, dtype=torch.float32) -> torch.Tensor:
    logits = LOGITS.to(dtype).expand(n, -1).contiguous()
    return sample(logits, [_seq(params)] * n, torch.Generator().manual_seed(0))


def test_temperature_alone_draws_from_the_scaled_softmax():
    """No filter: the one-pass Gumbel-max path, on float32 and bf16 logits."""
    for t in (0.5, 1.0, 2.5):
        for dtype in (torch.float32, torch.bfloat16):
            tokens = _draw(SamplingParams(temperature=t), dtype=dtype)
            assert tokens.dtype == torch.int64
            assert_law(tokens, torch.softmax(LOGITS.to(dtype).double() / t, -1))


def test_filters_draw_from_the_kept_set():
    """With top-k (and min-p) the probability path: the renormalised kept set."""
    p = torch.softmax(LOGITS.double() / 0.8, -1)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[p.topk(3).indices] = True
    assert_law(_draw(SamplingParams(temperature=0.8, top_k=3)), torch.where(keep, p, 0.0))
    assert_law(_draw(SamplingParams(temperature=0.8, min_p=0.3)), torch.where(p >= 0.3 * p.max(), p, 0.0))


def test_mixed_rows_greedy_seeded_and_shared():
    """Greedy rows take the argmax; a seeded row draws the same token whatever shares its batch (on both
    paths); shared rows draw from their own temperature."""
    n = 4000
    for extra in ({}, {"top_k": 5}):
        seeded = SamplingParams(temperature=1.3, seed=11, **extra)
        alone = sample(LOGITS[None].clone(), [_seq(seeded, 11)], torch.Generator().manual_seed(0))
        seqs = [_seq(SamplingParams(temperature=0)), _seq(seeded, 11)] + [_seq(SamplingParams(temperature=0.7))] * n
        logits = LOGITS.expand(len(seqs), -1).contiguous()
        tokens = sample(logits, seqs, torch.Generator().manual_seed(1))
        assert tokens[0] == LOGITS.argmax() and tokens[1] == alone[0]
        if not extra:
            assert_law(tokens[2:], torch.softmax(LOGITS.double() / 0.7, -1))

"""Scheduler without a model: token budget, decodes before prefill chunks, chunked prefill, max_num_seqs,
preemption by recompute."""
from __future__ import annotations

from pagoda.engine.block_manager import BlockManager
from pagoda.engine.scheduler import Scheduler
from pagoda.engine.sequence import SequenceStatus
from tests.engine.helpers import make_seq


def _step(sched: Scheduler, sample_token: int = 7):
    """schedule, 'run' (count the KV as computed), and append a token to every sequence that samples."""
    batch = sched.schedule()
    plan = [(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]
    sched.update_after_step(batch)
    for seq, _ in plan:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(sample_token)
    return plan


def _finish_all(sched: Scheduler):
    for seq in list(sched.running) + list(sched.waiting):
        sched.finish(seq)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_budget_and_chunked_prefill():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = make_seq(list(range(16)), rid="a"), make_seq(list(range(100, 106)), rid="b")
    sched.add(a)
    sched.add(b)
    assert _step(sched) == [(a, 10)]                 # a's first chunk fills the budget
    assert _step(sched) == [(a, 6), (b, 4)]          # a's rest, b's first chunk
    assert a.num_output_tokens == 1 and b.num_output_tokens == 0
    assert _step(sched) == [(a, 1), (b, 2)]          # decode first, then b's last chunk
    assert b.num_output_tokens == 1
    assert _step(sched) == [(a, 1), (b, 1)]
    _finish_all(sched)


def test_no_chunking_waits_for_a_whole_prompt():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10, enable_chunked_prefill=False)
    a, b = make_seq(list(range(8)), rid="a"), make_seq(list(range(100, 106)), rid="b")
    sched.add(a)
    sched.add(b)
    assert _step(sched) == [(a, 8)]
    assert _step(sched) == [(a, 1), (b, 6)]
    _finish_all(sched)


def test_max_num_seqs():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [make_seq([i, i + 1], rid=str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert [s for s, _ in _step(sched)] == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]
    sched.finish(seqs[0])
    assert [s for s, _ in _step(sched)] == [seqs[1], seqs[2]]
    _finish_all(sched)


def test_preemption_by_recompute():
    """Two sequences that fit only one at a time: the later one is preempted, recomputed later with its
    output tokens, and resumes where it was."""
    sched = Scheduler(BlockManager(4, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq(list(range(7)), rid="a"), make_seq(list(range(50, 57)), rid="b")
    sched.add(a)
    sched.add(b)
    assert _step(sched) == [(a, 7), (b, 7)]          # 2 pages each: the cache is full
    assert _step(sched) == [(a, 1), (b, 1)]          # position 7 still fits the second pages
    plan = _step(sched)                              # a needs a third page: b (admitted last) is preempted
    assert plan == [(a, 1)] and b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.num_output_tokens == 2 and sched.num_preemptions == 1
    sched.finish(a)
    plan = _step(sched)                              # b comes back: prompt + its 2 outputs recomputed
    assert plan == [(b, 9)] and b.num_output_tokens == 3
    _finish_all(sched)


def test_preempted_sequence_finds_its_blocks_in_the_prefix_cache():
    sched = Scheduler(BlockManager(5, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq(list(range(9)), rid="a"), make_seq(list(range(50, 57)), rid="b")
    sched.add(a)
    sched.add(b)
    _step(sched)                                     # a: 3 pages, b: 2 pages: the cache is full
    _step(sched)
    assert _step(sched) == [(a, 1)]                  # b's position 8 needs a third page: b preempts itself
    assert b.status is SequenceStatus.WAITING
    sched.finish(a)
    plan = _step(sched)
    assert plan == [(b, 1)]                          # its two full blocks (8 tokens) were still cached
    assert b.num_cached_tokens == 7                  # (counted as prompt tokens found in the cache)
    _finish_all(sched)

"""BlockManager: reference counts, prefix-cache hits (verified), least-recently-freed reuse."""
from __future__ import annotations

import pytest

from pagoda.engine import block_manager as bm_mod
from pagoda.engine.block_manager import BlockManager
from tests.engine.helpers import make_seq


def _run(bm: BlockManager, seq, n=None) -> None:
    """Allocate and 'compute' the whole sequence (as a step would), registering its full blocks."""
    hits = bm.get_computed_blocks(seq) if not seq.block_table else []
    n = seq.num_tokens - seq.num_computed_tokens - len(hits) * bm.block_size if n is None else n
    assert bm.allocate_slots(seq, n, hits)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


def test_allocate_and_free():
    bm = BlockManager(8, 4)
    seq = make_seq(list(range(10)))
    _run(bm, seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert [bm.blocks[b].ref_count for b in seq.block_table] == [1, 1, 1]
    assert abs(bm.usage - 3 / 8) < 1e-9
    bm.free_seq(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == [] and seq.num_computed_tokens == 0


def test_allocation_fails_without_change():
    bm = BlockManager(2, 4)
    seq = make_seq(list(range(12)))
    assert not bm.allocate_slots(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    assert bm.allocate_slots(seq, 8) and len(seq.block_table) == 2


def test_prefix_hit_shares_pages_and_counts_references():
    bm = BlockManager(16, 4)
    a = make_seq(list(range(13)))
    _run(bm, a)
    b = make_seq(list(range(9)) + [99, 98])    # shares two full blocks (8 tokens) with a
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_table[:2]
    assert bm.allocate_slots(b, b.num_tokens - 8, hits)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert [bm.blocks[x].ref_count for x in hits] == [2, 2]
    bm.free_seq(a)
    assert [bm.blocks[x].ref_count for x in hits] == [1, 1]
    bm.free_seq(b)
    assert bm.num_free_blocks == 16


def test_last_token_is_never_taken_from_the_cache():
    bm = BlockManager(16, 4)
    a = make_seq(list(range(8)) + [7])
    _run(bm, a)
    same = make_seq(list(range(8)))    # block-aligned: both blocks cached, but the last token must be computed
    assert bm.get_computed_blocks(same) == a.block_table[:1]


def test_hit_on_free_cached_block_revives_it():
    bm = BlockManager(4, 4)
    a = make_seq(list(range(9)))
    _run(bm, a)
    cached = a.block_table[:2]
    bm.free_seq(a)
    b = make_seq(list(range(9)))
    hits = bm.get_computed_blocks(b)
    assert hits == cached
    assert bm.allocate_slots(b, 1, hits)
    assert bm.num_free_blocks == 1 and all(bm.blocks[h].ref_count == 1 for h in hits)
    bm.free_seq(b)


def test_collision_is_verified(monkeypatch):
    """With every block hashing the same, a lookup must still refuse a page whose tokens differ."""
    monkeypatch.setattr(bm_mod, "block_hash", lambda parent, tokens: 1)
    bm = BlockManager(8, 4)
    a = make_seq([1, 2, 3, 4, 5])
    _run(bm, a)
    b = make_seq([9, 9, 9, 9, 5])
    assert bm.get_computed_blocks(b) == []
    c = make_seq([1, 2, 3, 4, 6])
    assert len(bm.get_computed_blocks(c)) == 1
    bm.free_seq(a)


def test_lru_eviction_order():
    """Free pages are reused least recently freed first; pages without a cached block before any cached one."""
    bm = BlockManager(4, 2)
    a, b = make_seq([1, 2, 3]), make_seq([4, 5, 6])
    _run(bm, a)
    _run(bm, b)
    a_full, b_full = a.block_table[0], b.block_table[0]
    bm.free_seq(a)
    bm.free_seq(b)
    c = make_seq([7, 8, 9, 10, 11])     # needs 3 pages: the 2 partial pages, then a's cached block (older)
    _run(bm, c)
    assert a_full in c.block_table and b_full not in c.block_table
    assert bm.get_computed_blocks(make_seq([1, 2, 3])) == []          # evicted
    assert bm.get_computed_blocks(make_seq([4, 5, 6])) == [b_full]    # still cached
    bm.free_seq(c)


def test_hit_rate_statistics():
    bm = BlockManager(16, 4)
    a = make_seq(list(range(9)))
    _run(bm, a)
    b = make_seq(list(range(9)))
    _run(bm, b)
    assert bm.num_queried_tokens == 18 and bm.num_hit_tokens == 8
    assert bm.hit_rate == pytest.approx(8 / 18)
    bm.free_seq(a)
    bm.free_seq(b)


def test_no_prefix_caching():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    _run(bm, a)
    assert bm.get_computed_blocks(make_seq(list(range(9)))) == [] and not bm.hash_to_block
    bm.free_seq(a)

"""KV pages: allocation with reference counts and automatic prefix caching.

A page ("block") holds ``block_size`` consecutive tokens of one sequence. Once every token of a block
has its KV computed, the block is registered under a hash of its parent block's hash and its own
tokens, so the hash names the whole prefix up to and including the block. A new sequence whose
leading blocks hash the same takes those pages instead of computing them again (a hit is verified:
the stored tokens and parent hash must equal the sequence's). A page whose reference count drops to
zero keeps its KV and its hash and joins the free list; pages are reused least recently freed first,
and a reused page loses its hash. Pages that never held a full block are reused before cached ones.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

from pagoda.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "parent_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.parent_hash: int | None = None


def block_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """A 128-bit hash of (parent block's hash, this block's tokens). A keyed cryptographic hash rather than
    Python's ``hash``: prompts from different users must not be able to collide on purpose."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"-" if parent_hash is None else parent_hash.to_bytes(16, "little"))
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return int.from_bytes(h.digest(), "little")


class BlockManager:
    """Pages ``0 .. num_blocks - 1`` of the KV cache and the prefix cache over them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free pages in reuse order (first = reused first). Holds cached pages too (ref_count 0, hash set).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_queried_tokens = 0     # prefix-cache statistics (prompt tokens looked up / found)
        self.num_hit_tokens = 0

    # -- queries -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of the pages held by sequences."""
        return 1.0 - len(self.free) / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Pages holding the longest cached prefix of ``seq``, in order (not yet taken).

        At most ``(num_tokens - 1) // block_size`` blocks: the last token is always computed (its logits
        are needed) and never into a shared page.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent_hash != parent:
                break     # a hash collision: never reuse a page whose content differs
            hits.append(block_id)
            parent = h
        return hits

    # -- allocation ----------------------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Make the pages of ``seq`` cover its first ``num_computed_tokens + num_new_tokens`` tokens (after
        taking ``computed_blocks``, the cached prefix of a sequence without pages). False, changing
        nothing, when there are not enough free pages."""
        if not computed_blocks and -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) \
                <= len(seq.block_table):
            return True          # a decode step inside the last page: nothing to take (the common case)
        computed_blocks = list(computed_blocks)
        if computed_blocks and seq.block_table:
            raise ValueError("computed_blocks are only taken by a sequence that holds no pages")
        computed = seq.num_computed_tokens + len(computed_blocks) * self.block_size
        new_blocks = self.blocks_for(computed + num_new_tokens) - len(seq.block_table) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)   # cached pages on the free list
        if max(new_blocks, 0) + revived > len(self.free):
            return False
        if not seq.block_table and seq.num_computed_tokens == 0:    # first pages: count the lookup
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += len(computed_blocks) * self.block_size
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table.extend(computed_blocks)
        if computed_blocks:
            seq.num_computed_tokens = computed
            seq.num_cached_tokens = max(seq.num_cached_tokens, min(computed, seq.num_prompt_tokens))
            parent = None
            for block_id in computed_blocks:
                parent = self.blocks[block_id].hash
                seq.block_hashes.append(parent)
        for _ in range(new_blocks):
            seq.block_table.append(self._take_free())
        return True

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:       # evict: the page's old content is gone
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash = block.token_ids = block.parent_hash = None
        block.ref_count = 1
        return block_id

    def free_seq(self, seq: Sequence) -> None:
        """Drop ``seq``'s references. Its cached pages stay findable until reused: the last block first,
        since a later request is more likely to share a sequence's beginning than its end."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:     # nothing worth keeping: reuse it first
                    self.free.move_to_end(block_id, last=False)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register every block of ``seq`` whose tokens all have their KV now (call after the step ran)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        if len(seq.block_hashes) >= min(seq.num_computed_tokens, seq.num_tokens) // bs:
            return               # no block filled since the last call (15 steps in 16 at page 16)
        # Only blocks whose tokens are known: a token sampled on the device may have its KV computed before
        # the host has read it (the engine reads sampled tokens one step behind).
        for i in range(len(seq.block_hashes), min(seq.num_computed_tokens, seq.num_tokens) // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids, block.parent_hash = h, tokens, parent
                # An equal block computed at the same time by another sequence keeps the entry.
                self.hash_to_block.setdefault(h, block.block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block whose page is free (e.g. after new weights were loaded)."""
        for block_id in self.free:
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash = block.token_ids = block.parent_hash = None

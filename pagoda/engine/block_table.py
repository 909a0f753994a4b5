"""A sequence's page ids (`Sequence.block_table`): a list that keeps an int32 array of itself in step.

Every step packs the page ids of every running request into one int32 table for the device (`ModelRunner`):
at 256 requests of ~1,100 tokens that is ~18k ids. Converted from Python ints every step they are the larger
part of building the step's tables, host work that the part-full decode steps of a server pay in full. Cut
from arrays kept in step (each id written once, when its page is taken), the step's table is one
``np.concatenate`` (`benchmarks/step_tables.py` times both).

The list interface stays whole (the block manager, the cascade grouping and the tests index, slice and
compare it as a list); every method that changes the list keeps the array in step.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class BlockTable(list):
    """Page ids in order (a ``list[int]``); `ids` is the same ids as an int32 array."""

    __slots__ = ("_ids",)

    def __init__(self, ids: Iterable[int] = ()):
        super().__init__(ids)
        self._ids = np.empty(max(16, 2 * len(self)), dtype=np.int32)
        self._ids[:len(self)] = self

    def ids(self) -> np.ndarray:
        """int32 ``[len(self)]``: a view, valid until the table next changes."""
        return self._ids[:len(self)]

    def _reserve(self, n: int, keep: int) -> None:
        if n > self._ids.shape[0]:
            grown = np.empty(max(n, 2 * self._ids.shape[0]), dtype=np.int32)
            grown[:keep] = self._ids[:keep]
            self._ids = grown

    def _resync(self) -> None:
        self._reserve(len(self), 0)
        self._ids[:len(self)] = self

    def append(self, page: int) -> None:
        n = len(self)
        super().append(page)
        self._reserve(n + 1, n)
        self._ids[n] = page

    def extend(self, pages: Iterable[int]) -> None:
        pages = list(pages)
        n = len(self)
        super().extend(pages)
        self._reserve(n + len(pages), n)
        self._ids[n:n + len(pages)] = pages

    def __iadd__(self, pages: Iterable[int]) -> BlockTable:
        self.extend(pages)
        return self

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` ids (the array's prefix is already right)."""
        super().__delitem__(slice(n, None))

    # Every other change rewrites the array (none is on a hot path).
    def insert(self, index, page) -> None:
        super().insert(index, page)
        self._resync()

    def pop(self, index=-1):
        page = super().pop(index)
        self._resync()
        return page

    def remove(self, page) -> None:
        super().remove(page)
        self._resync()

    def __setitem__(self, index, value) -> None:
        super().__setitem__(index, value)
        self._resync()

    def __delitem__(self, index) -> None:
        super().__delitem__(index)
        self._resync()

    def __imul__(self, n) -> BlockTable:
        super().__imul__(n)
        self._resync()
        return self

    def sort(self, *args, **kwargs) -> None:
        super().sort(*args, **kwargs)
        self._resync()

    def reverse(self) -> None:
        super().reverse()
        self._resync()

    def __reduce__(self):
        return (BlockTable, (list(self),))


def page_ids(table: list[int], pages: int) -> np.ndarray:
    """int32 ``[pages]``: the first ``pages`` ids of a block table (a `BlockTable` without converting)."""
    if isinstance(table, BlockTable):
        return table.ids()[:pages]
    return np.asarray(table[:pages], dtype=np.int32)

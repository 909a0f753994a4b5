"""Build multi-level cascade metadata from the requests' page lists (host-side planning helper).

Level 0 holds the full pages every request shares (a system prompt); with ``num_levels=3`` level 1
holds what adjacent runs of requests share beyond that (a few-shot block, a document); the last level
holds each request's own remaining pages. A page is shared only if it is full (``page_size`` tokens)
and is not the last page of any request that shares it, so the shared KV is identical for all of them.
Queries of a level-0/1 group are the concatenated queries of its requests, so requests sharing a
level-1 prefix must be adjacent in the batch (FlashInfer's layout); non-adjacent ones stay unique.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.ops import _checks

__all__ = ["CascadeLevels", "build_cascade_levels", "level_csr"]


@dataclass(slots=True)
class CascadeLevels:
    """Per-level int32 tensors as `MultiLevelCascadeAttentionWrapper.plan` takes them."""
    qo_indptr_arr: list
    paged_kv_indptr_arr: list
    paged_kv_indices_arr: list
    paged_kv_last_page_len_arr: list
    shared_pages: list           # number of pages in each shared level (per group for level 1)

    def as_plan_args(self) -> tuple:
        return self.qo_indptr_arr, self.paged_kv_indptr_arr, self.paged_kv_indices_arr, self.paged_kv_last_page_len_arr


def _common_full_prefix(lists: list[list[int]], starts: list[int], ends: list[int]) -> int:
    """Number of pages (from each list's start) equal across all lists and before each list's end."""
    n = 0
    while True:
        if any(s + n >= e for s, e in zip(starts, ends)):
            return n
        page = lists[0][starts[0] + n]
        if any(lst[s + n] != page for lst, s in zip(lists, starts)):
            return n
        n += 1


def _int_list(name: str, values, minimum: int) -> list[int]:
    """A list/tuple of ints (not bools) >= minimum, as a list; errors name ``name[i]``."""
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of ints, got {type(values).__name__}")
    return [_checks.check_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(values)]


def level_csr(groups) -> tuple[list[int], list[int], list[int], list[int]]:
    """One level's ``[(num_queries, pages, last_page_len)]`` as ``(qo_indptr, kv_indptr, kv_indices,
    last_page_len)`` lists (a group without pages has last_page_len 0)."""
    qo, kv, idx, last = [0], [0], [], []
    for nq, pages, lpl in groups:
        qo.append(qo[-1] + nq)
        kv.append(kv[-1] + len(pages))
        idx += pages
        last.append(lpl if pages else 0)
    return qo, kv, idx, last


def _tensors(groups, device):
    """`level_csr` as int32 tensors on ``device``."""
    return tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in level_csr(groups))


def build_cascade_levels(page_lists: list[list[int]], last_page_lens: list[int], qo_lens: list[int], page_size: int,
                         num_levels: int = 2, device: torch.device | str | None = None) -> CascadeLevels:
    """Split each request's pages into shared levels and a unique last level.

    Args:
        page_lists: each request's page ids, in order (its CSR ``kv_indices`` slice).
        last_page_lens: tokens in each request's last page (1..page_size; 0 for a request without pages).
        qo_lens: query tokens of each request this step (1 for decode).
        page_size: tokens per page.
        num_levels: 2 (shared prefix + unique) or 3 (+ prefixes shared by adjacent requests).
    """
    if isinstance(num_levels, bool) or num_levels not in (2, 3):
        raise ValueError(f"num_levels must be 2 or 3, got {num_levels!r}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    if not isinstance(page_lists, (list, tuple)):
        raise TypeError(f"page_lists must be a list of lists of page ids, got {type(page_lists).__name__}")
    page_lists = [_int_list(f"page_lists[{i}]", p, 0) for i, p in enumerate(page_lists)]
    last_page_lens = _int_list("last_page_lens", last_page_lens, 0)
    qo_lens = _int_list("qo_lens", qo_lens, 0)
    n = len(page_lists)
    if not (len(last_page_lens) == len(qo_lens) == n) or n == 0:
        raise ValueError(f"page_lists, last_page_lens and qo_lens must have the same non-zero length, got "
                         f"{n}, {len(last_page_lens)}, {len(qo_lens)}")
    for i, (pages, lpl) in enumerate(zip(page_lists, last_page_lens)):
        if (pages and not 1 <= lpl <= page_size) or (not pages and lpl != 0):
            raise ValueError(f"last_page_lens[{i}] = {lpl} is invalid for {len(pages)} pages of size {page_size}")
    # A page may be shared only while it is full: exclude each request's last page unless it is full.
    ends = [len(p) - (0 if lpl == page_size else 1) if p else 0 for p, lpl in zip(page_lists, last_page_lens)]
    starts = [0] * n
    total_q = sum(qo_lens)
    p0 = _common_full_prefix(page_lists, starts, ends)
    levels = [[(total_q, list(page_lists[0][:p0]), page_size)]]
    shared = [p0]
    starts = [p0] * n
    if num_levels == 3:
        groups, i = [], 0
        while i < n:            # maximal runs of adjacent requests that share their next page
            j = i + 1
            while (j < n and starts[i] < ends[i] and starts[j] < ends[j]
                   and page_lists[j][starts[j]] == page_lists[i][starts[i]]):
                j += 1
            members = list(range(i, j))
            k = _common_full_prefix([page_lists[m] for m in members], [starts[m] for m in members],
                                    [ends[m] for m in members]) if j - i > 1 else 0
            groups.append((sum(qo_lens[m] for m in members), list(page_lists[i][starts[i]:starts[i] + k]), page_size))
            shared.append(k)
            for m in members:
                starts[m] += k
            i = j
        levels.append(groups)
    levels.append([(qo_lens[r], list(page_lists[r][starts[r]:]), last_page_lens[r]) for r in range(n)])
    arrs = [_tensors(g, device) for g in levels]
    return CascadeLevels(*(list(a) for a in zip(*arrs)), shared_pages=shared)

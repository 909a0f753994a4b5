"""Automatic cascade attention for decode steps whose requests share cached prefix pages.

Requests that took the same prefix-cache pages (`BlockManager.get_computed_blocks`: a system prompt, a
conversation's earlier turns) hold the same physical page ids at the head of their block tables. A decode
step over them can read each shared page once for the whole group instead of once per request:
`MultiLevelCascadeAttentionWrapper` with

- level 0: for each group of requests sharing their first pages, the pages all of them share (one
  "request" whose queries are the group's queries);
- level 1 (only when some subgroup shares more): within a level-0 group, the further pages a subgroup
  shares (a conversation under a system prompt);
- the last level: each request's own remaining pages (its current turn and the page being written).

The levels' partial states are merged exactly through their LSEs, so the step computes the same attention
as the plain decode over each request's pages (up to floating-point reordering).

When it pays is one rule, `cascade_pays`, from the measured crossover of cascade against plain paged decode
(``benchmarks/results/2026-11-22-h200-cascade/``, `docs/cascade.md`): a group of at least 32 requests
sharing 32k tokens, or at least 128 sharing 4k; never below 4k shared tokens, where the cascade's extra
launches cost more host time than the shared reads save. ``cascade="auto"`` cascades a step when some group
passes it, ``"on"`` whenever some page is shared by two running requests, ``"off"`` never. Cascade steps
run eagerly (outside the decode CUDA graphs): the level structure changes from step to step.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from pagoda.ops.cascade import MultiLevelCascadeAttentionWrapper

__all__ = ["CASCADE_THRESHOLDS", "CascadeDecode", "CascadeGroups", "cascade_groups", "cascade_pays",
           "group_shared_prefixes", "should_cascade"]

# (shared tokens at least, requests sharing them at least): cascade pays from there on. Measured on an H200
# (one attention call, page 16, 256 unique tokens per request): 32k shared tokens at batch 32 run 4.74x faster
# than plain decode (0.78x at batch 8); 4k at batch 128 2.17x (0.87x at batch 32); 1k never above 0.74x.
CASCADE_THRESHOLDS: tuple[tuple[int, int], ...] = ((32768, 32), (4096, 128))


def cascade_pays(shared_tokens: int, group_size: int) -> bool:
    """Whether a group of ``group_size`` decoding requests that share ``shared_tokens`` tokens of KV pages
    decodes faster with cascade attention than with plain paged decode (`CASCADE_THRESHOLDS`: the first
    row whose shared length the group reaches decides; between rows the lower row's batch holds, since the
    crossover was measured at those lengths only)."""
    for tokens, size in CASCADE_THRESHOLDS:
        if shared_tokens >= tokens:
            return group_size >= size
    return False


@dataclass(slots=True)
class CascadeGroups:
    """A decode step's requests grouped by the pages they share.

    ``order``: the batch rows in cascade order (the queries of a group must be adjacent). ``levels``: per
    level, its entries ``(num_queries, pages, last_page_len)`` in that order; two or three levels.
    ``shared``: ``(shared_tokens, group_size)`` of every group of two or more requests sharing pages (a
    level-1 group counts the level-0 pages above it too), what `cascade_pays` judges.
    """
    order: list[int]
    levels: list[list[tuple[int, list[int], int]]]
    shared: list[tuple[int, int]]

    @property
    def num_levels(self) -> int:
        return len(self.levels)


def _common_prefix(tables: list[list[int]], rows: list[int], start: int, limits: list[int]) -> int:
    """Pages from ``start`` equal in every ``tables[r]`` of ``rows`` and before each row's limit. Checks whole
    slices (C-level list comparison) rather than page by page: a group's rows usually agree on all of it."""
    first = tables[rows[0]]
    k = min(limits[r] for r in rows) - start
    ref = first[start:start + k]
    for r in rows[1:]:
        if k <= 0:
            return 0
        if tables[r][start:start + k] == ref:
            continue
        lo, hi = 0, k - 1          # the prefix equality is monotone: bisect the longest equal one
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tables[r][start:start + mid] == first[start:start + mid]:
                lo = mid
            else:
                hi = mid - 1
        k = lo
        ref = first[start:start + k]
    return max(k, 0)


def _split_by_page(rows: list[int], tables: list[list[int]], depth: int, limits: list[int]) -> list[list[int]]:
    """``rows`` bucketed by their page at ``depth`` (rows without a shareable page there stay alone), in the
    order of each bucket's first row."""
    buckets: dict[int, list[int]] = defaultdict(list)
    out: list[list[int]] = []
    for r in rows:
        if depth < limits[r]:
            page = tables[r][depth]
            if page not in buckets:
                out.append(buckets[page])
            buckets[page].append(r)
        else:
            out.append([r])
    return out


def group_shared_prefixes(block_tables: list[list[int]], num_pages: list[int], last_page_lens: list[int],
                          page_size: int) -> CascadeGroups | None:
    """Group a decode step's requests (one query each) by shared leading pages; None when no page is shared.

    Args:
        block_tables: each request's block table (at least ``num_pages[i]`` page ids; not copied).
        num_pages: pages each request uses this step (its new token's page included).
        last_page_lens: tokens in each request's last page, 1..page_size.
        page_size: tokens per page.

    A request's last page holds the token written this step and is never shared. Requests are grouped by
    their first page, then the pages the whole group shares (level 0); within a group, by the next page and
    what each subgroup shares further (level 1, kept only when some subgroup shares something).
    """
    n = len(block_tables)
    limits = [p - 1 for p in num_pages]       # shareable pages: all but the one being written
    first_pages = [block_tables[r][0] for r in range(n) if limits[r] > 0]
    if len(set(first_pages)) == len(first_pages):
        return None                             # no two requests share a first page: nothing to share
    groups0 = _split_by_page(list(range(n)), block_tables, 0, limits)
    level0, level1, shared, depth = [], [], [], [0] * n
    for rows in groups0:
        k0 = _common_prefix(block_tables, rows, 0, limits) if len(rows) > 1 else 0
        level0.append((rows, k0))
        if k0:
            shared.append((k0 * page_size, len(rows)))
        subs = []
        for sub in (_split_by_page(rows, block_tables, k0, limits) if len(rows) > 1 else [rows]):
            k1 = _common_prefix(block_tables, sub, k0, limits) if len(sub) > 1 else 0
            subs.append((sub, k1))
            if k1:
                shared.append(((k0 + k1) * page_size, len(sub)))
            for r in sub:
                depth[r] = k0 + k1
        level1.append(subs)
    if not shared:
        return None
    three = any(k1 for subs in level1 for _, k1 in subs)
    order = [r for subs in level1 for sub, _ in subs for r in sub]
    levels = [[(len(rows), list(block_tables[rows[0]][:k0]), page_size) for rows, k0 in level0]]
    if three:
        levels.append([(len(sub), list(block_tables[sub[0]][k0:k0 + k1]), page_size)
                       for (_, k0), subs in zip(level0, level1, strict=True) for sub, k1 in subs])
    levels.append([(1, list(block_tables[r][depth[r]:num_pages[r]]), last_page_lens[r]) for r in order])
    return CascadeGroups(order, levels, shared)


def _may_pay(block_tables: list[list[int]], num_pages: list[int], page_size: int) -> bool:
    """A cheap necessary condition of `cascade_pays` for some group (O(batch)): as many requests as the
    smallest threshold's group hold the same page where the smallest threshold's shared length ends."""
    depth = -(-min(t for t, _ in CASCADE_THRESHOLDS) // page_size) - 1
    counts: dict[int, int] = defaultdict(int)
    for table, n in zip(block_tables, num_pages, strict=True):
        if n - 1 > depth:
            counts[table[depth]] += 1
    return max(counts.values(), default=0) >= min(s for _, s in CASCADE_THRESHOLDS)


def cascade_groups(mode: str, block_tables: list[list[int]], num_pages: list[int], last_page_lens: list[int],
                   page_size: int) -> CascadeGroups | None:
    """The groups of a decode step that cascades under ``mode`` (arguments as `group_shared_prefixes`), or
    None when it runs plain decode. ``"auto"`` first checks in O(batch) that some group could pass the rule
    (a step that shares only short prefixes costs no grouping)."""
    if mode == "off" or (mode == "auto" and not _may_pay(block_tables, num_pages, page_size)):
        return None
    groups = group_shared_prefixes(block_tables, num_pages, last_page_lens, page_size)
    return groups if should_cascade(mode, groups) else None


def should_cascade(mode: str, groups: CascadeGroups | None) -> bool:
    """The step's decision: ``"on"`` cascades whenever pages are shared, ``"auto"`` when some group passes
    `cascade_pays`, ``"off"`` never."""
    if groups is None or mode == "off":
        return False
    if mode == "on":
        return True
    return any(cascade_pays(tokens, size) for tokens, size in groups.shared)


class CascadeDecode:
    """A decode step's attention through `MultiLevelCascadeAttentionWrapper` (two or three levels), with the
    engine's wrapper interface: `plan` once per step, ``run(q, kv_cache)`` in every layer.

    The batch keeps its order everywhere else (KV append, sampling rows); only attention sees the queries in
    cascade order: ``run`` gathers them, runs the levels and scatters the output back.
    """

    def __init__(self, workspace: torch.Tensor, kv_layout: str = "NHD"):
        self.device = workspace.device
        self.wrappers = {n: MultiLevelCascadeAttentionWrapper(n, workspace, kv_layout) for n in (2, 3)}
        self.wrapper: MultiLevelCascadeAttentionWrapper | None = None
        self.perm: torch.Tensor | None = None     # int64 [batch] device: cascade row -> batch row (None: same)
        self._host = None                          # the pinned host arrays of the last plan (alive until copied)

    def plan(self, groups: CascadeGroups, plan_args: tuple, plan_kwargs: dict, pin: bool = False) -> CascadeDecode:
        """Plan the levels of ``groups``. plan_args: ``(num_qo_heads, num_kv_heads, head_dim, page_size)``;
        plan_kwargs: ``sm_scale``, ``logits_soft_cap``, ``q_data_type``, ``kv_data_type`` (window_left must
        be -1: a shared level ignores positions). Reads no device memory."""
        qo, kvp, idx, last = [], [], [], []
        for entries in groups.levels:
            q_ptr, k_ptr = [0], [0]
            pages: list[int] = []
            lens = []
            for nq, p, lpl in entries:
                q_ptr.append(q_ptr[-1] + nq)
                k_ptr.append(k_ptr[-1] + len(p))
                pages += p
                lens.append(lpl if p else 0)
            qo.append(q_ptr)
            kvp.append(k_ptr)
            idx.append(pages)
            last.append(lens)
        arrays = [a for level in zip(qo, kvp, idx, last, strict=True) for a in level]
        flat = np.fromiter(itertools.chain.from_iterable(arrays), dtype=np.int32, count=sum(len(a) for a in arrays))
        host = torch.from_numpy(flat)
        if pin:
            host = host.pin_memory()
        views, o = [], 0
        for a in arrays:
            views.append(host[o:o + len(a)])
            o += len(a)
        n = groups.num_levels
        per = [views[i::4] for i in range(4)]     # qo_indptr, kv_indptr, kv_indices, last_page_len per level
        self.wrapper = self.wrappers[n]
        self.wrapper.plan(*per, *plan_args, causal=True, **plan_kwargs)
        self.perm, self._host = None, (host,)
        if groups.order != sorted(groups.order):
            perm = torch.tensor(groups.order, dtype=torch.int64)
            perm = perm.pin_memory() if pin else perm
            self.perm, self._host = perm.to(self.device, non_blocking=pin), (host, perm)
        return self

    def run(self, q: torch.Tensor, paged_kv_cache: torch.Tensor) -> torch.Tensor:
        """q ``[batch, num_qo_heads, head_dim]`` in batch order -> attention output, same shape and order."""
        if self.perm is None:
            return self.wrapper.run(q, paged_kv_cache)
        out = self.wrapper.run(q.index_select(0, self.perm), paged_kv_cache)
        return torch.empty_like(out).index_copy_(0, self.perm, out)

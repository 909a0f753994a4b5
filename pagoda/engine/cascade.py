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
passes it, ``"on"`` whenever some page is shared by two running requests, ``"off"`` never.

Under ``"on"``, a two-level step with at most `GRAPH_GROUPS` groups sharing pages replays a CUDA graph of its own
(`pagoda.engine.cuda_graph.DecodeGraphs`, `cascade_graph_sizes`): the shared level is a graph-mode batch
prefill over the groups' pages, each row's own pages a graph-mode batch decode (`graph_layout` puts the sharing
groups' rows first). Three-level steps and steps with more groups run eagerly.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from pagoda.engine.host_tables import pack_int32
from pagoda.ops.cascade import MultiLevelCascadeAttentionWrapper, merge_state_in_place
from pagoda.ops.cascade_levels import level_csr
from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper
from pagoda.ops.prefill import BatchPrefillWithPagedKVCacheWrapper

__all__ = ["CASCADE_THRESHOLDS", "CascadeDecode", "CascadeGraphBuffers", "CascadeGroups", "cascade_groups",
           "cascade_graph_sizes", "cascade_pays", "graph_layout", "group_shared_prefixes", "should_cascade"]

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


def cascade_graph_sizes(mode: str, sizes: list[int]) -> list[int]:
    """The decode-graph sizes that also get a cascade graph: under ``"on"`` every size from 2; none under
    ``"off"``, nor under ``"auto"``, whose rule (`CASCADE_THRESHOLDS`) was measured on eager cascades: its
    cascade steps stay eager until the crossover is measured with the graphs, and its start-up captures no
    second ladder."""
    return [b for b in sizes if b >= 2] if mode == "on" else []


def should_cascade(mode: str, groups: CascadeGroups | None) -> bool:
    """The step's decision: ``"on"`` cascades whenever pages are shared, ``"auto"`` when some group passes
    `cascade_pays`, ``"off"`` never."""
    if groups is None or mode == "off":
        return False
    if mode == "on":
        return True
    return any(cascade_pays(tokens, size) for tokens, size in groups.shared)


# Level-0 groups a CUDA-graph cascade holds at most (a step with more sharing groups runs eagerly): the shared
# level's grid covers this many groups whatever the step has.
GRAPH_GROUPS = 8


@dataclass(slots=True)
class CascadeGraphBuffers:
    """The static device buffers of a CUDA-graph `CascadeDecode` of ``batch`` rows (all int32 but ``perm``):
    the shared level's table for up to ``groups`` groups (``shared_qo_indptr``, ``shared_kv_indptr [groups +
    1]``, ``shared_kv_indices [max_pages]``, ``shared_last [groups]``), each row's own pages (``own_kv_indptr
    [batch + 1]``, ``own_kv_indices [max_pages]``, ``own_last [batch]``) and the int64 row permutation ``perm
    [batch]``. Views of larger buffers serve smaller batches (one size runs at a time)."""
    shared_qo_indptr: torch.Tensor
    shared_kv_indptr: torch.Tensor
    shared_kv_indices: torch.Tensor
    shared_last: torch.Tensor
    own_kv_indptr: torch.Tensor
    own_kv_indices: torch.Tensor
    own_last: torch.Tensor
    perm: torch.Tensor

    @staticmethod
    def capacity(batch: int) -> int:
        """Sharing groups a batch of ``batch`` rows can hold: two rows a group at least, `GRAPH_GROUPS` at most."""
        return max(min(batch // 2, GRAPH_GROUPS), 1)

    @classmethod
    def allocate(cls, batch: int, max_pages: int, device: torch.device) -> CascadeGraphBuffers:
        g = cls.capacity(batch)

        def i32(n):
            return torch.zeros(n, dtype=torch.int32, device=device)
        return cls(i32(g + 1), i32(g + 1), i32(max_pages), i32(g), i32(batch + 1), i32(max_pages), i32(batch),
                   torch.arange(batch, dtype=torch.int64, device=device))

    def view(self, batch: int) -> CascadeGraphBuffers:
        """The buffers of a batch of ``batch`` rows (``<=`` this one's)."""
        g = self.capacity(batch)
        return CascadeGraphBuffers(self.shared_qo_indptr[:g + 1], self.shared_kv_indptr[:g + 1],
                                   self.shared_kv_indices, self.shared_last[:g], self.own_kv_indptr[:batch + 1],
                                   self.own_kv_indices, self.own_last[:batch], self.perm[:batch])

    @property
    def groups(self) -> int:
        return self.shared_last.shape[0]


def graph_layout(groups: CascadeGroups) -> tuple[list[int], list[tuple[int, list[int], int]],
                                                  list[tuple[list[int], int]]]:
    """A two-level step's layout for a CUDA-graph cascade: ``(order, shared, own)``, the rows of the groups
    that share pages first (``shared``: ``(num_queries, pages, last_page_len)`` per such group), the rows that
    share nothing after them; ``own``: each row's own ``(pages, last_page_len)`` in ``order``."""
    if groups.num_levels != 2:
        raise ValueError(f"a CUDA-graph cascade runs two levels, got {groups.num_levels}")
    level0, last = groups.levels
    own_of = {r: (p, lpl) for r, (_, p, lpl) in zip(groups.order, last, strict=True)}
    first, tail, shared, i = [], [], [], 0
    for nq, pages, lpl in level0:
        rows = groups.order[i:i + nq]
        i += nq
        if pages:
            first += rows
            shared.append((nq, pages, lpl))
        else:
            tail += rows
    order = first + tail
    return order, shared, [own_of[r] for r in order]


def _host_views(arrays: list[list[int]], pin: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The lists packed into one int32 host tensor (`pack_int32`) and a view of it per list."""
    host, spans = pack_int32(arrays, pin)
    return host, [host[a:b] for a, b in spans]


class CascadeDecode:
    """A decode step's attention through `MultiLevelCascadeAttentionWrapper` (two or three levels), with the
    engine's wrapper interface: `plan` once per step, ``run(q, kv_cache)`` in every layer.

    The batch keeps its order everywhere else (KV append, sampling rows); only attention sees the queries in
    cascade order: ``run`` gathers them, runs the levels and scatters the output back.

    With ``graph`` (`CascadeGraphBuffers` of ``b`` rows) it is the attention of a captured decode graph of
    batch ``b``: two levels only, every plan writes the same buffers, and ``run`` always permutes (rows past
    the step's requests are padding: identity, no keys).
    """

    def __init__(self, workspace: torch.Tensor, kv_layout: str = "NHD", graph: CascadeGraphBuffers | None = None):
        self.device = workspace.device
        self.graph = graph
        if graph is None:
            self.wrappers = {n: MultiLevelCascadeAttentionWrapper(n, workspace, kv_layout) for n in (2, 3)}
        else:
            # The shared level as a batch prefill over the groups' pages; each row's own pages as a batch
            # decode (one query a row: the decode kernel's grid, not a prefill grid sized by every row).
            self.shared = BatchPrefillWithPagedKVCacheWrapper(
                workspace, kv_layout, use_cuda_graph=True, qo_indptr_buf=graph.shared_qo_indptr,
                paged_kv_indptr_buf=graph.shared_kv_indptr, paged_kv_indices_buf=graph.shared_kv_indices,
                paged_kv_last_page_len_buf=graph.shared_last)
            # A graph-mode grid is sized by the padded batch, not by the groups: keep the shared level on the
            # Triton kernel (split-KV, query heads of a KV head packed in one tile) rather than the Gluon one.
            self.shared._gluon_ok = False
            self.own = BatchDecodeWithPagedKVCacheWrapper(
                workspace, kv_layout, use_cuda_graph=True, paged_kv_indptr_buffer=graph.own_kv_indptr,
                paged_kv_indices_buffer=graph.own_kv_indices, paged_kv_last_page_len_buffer=graph.own_last)
            # Each step's tables are fresh pinned arrays kept alive until copied (`_host`): no wait for them.
            self.shared._pinned_tables_async = self.own._pinned_tables_async = True
        self.wrapper: MultiLevelCascadeAttentionWrapper | None = None
        self.perm: torch.Tensor | None = None     # int64 [batch] device: cascade row -> batch row (None: same)
        self._host = None                          # the pinned host arrays of the last plan (alive until copied)

    @property
    def graph_batch(self) -> int | None:
        """The rows of a graph-mode instance (None: eager)."""
        return None if self.graph is None else self.graph.perm.shape[0]

    def fits(self, groups: CascadeGroups) -> bool:
        """Whether a graph-mode instance can run ``groups`` (two levels, at most its number of sharing groups)."""
        return (self.graph is not None and groups.num_levels == 2 and len(groups.order) <= self.graph_batch
                and sum(1 for _, pages, _ in groups.levels[0] if pages) <= self.graph.groups)

    def plan(self, groups: CascadeGroups, plan_args: tuple, plan_kwargs: dict, pin: bool = False) -> CascadeDecode:
        """Plan the levels of ``groups``. plan_args: ``(num_qo_heads, num_kv_heads, head_dim, page_size)``;
        plan_kwargs: ``sm_scale``, ``logits_soft_cap``, ``q_data_type``, ``kv_data_type`` (window_left must
        be -1: a shared level ignores positions). Reads no device memory."""
        if self.graph is not None:
            return self._plan_graph(groups, plan_args, plan_kwargs, pin)
        host, views = _host_views([a for entries in groups.levels for a in level_csr(entries)], pin)
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

    def _plan_graph(self, groups: CascadeGroups, plan_args: tuple, plan_kwargs: dict, pin: bool) -> CascadeDecode:
        if not self.fits(groups):
            raise ValueError(f"a CUDA-graph cascade of {self.graph_batch} rows and {self.graph.groups} groups "
                             f"cannot run {len(groups.order)} rows in {groups.num_levels} levels")
        order, shared, own = graph_layout(groups)
        b, rows = self.graph_batch, len(order)
        own_csr = level_csr([(1, pages, lpl) for pages, lpl in own])[1:]     # a decode: no qo_indptr
        host, views = _host_views([*level_csr(shared), *own_csr], pin)
        perm = torch.from_numpy(np.concatenate([np.asarray(order, dtype=np.int64), np.arange(rows, b, dtype=np.int64)]))
        if pin:
            perm = perm.pin_memory()
        self.shared.plan(*views[:4], *plan_args, causal=False, **plan_kwargs)
        self.own.plan(*views[4:], *plan_args, **plan_kwargs)
        self.graph.perm.copy_(perm, non_blocking=pin)
        self.perm, self._host = self.graph.perm, (host, perm)
        return self

    def run(self, q: torch.Tensor, paged_kv_cache: torch.Tensor) -> torch.Tensor:
        """q ``[batch, num_qo_heads, head_dim]`` in batch order -> attention output, same shape and order."""
        if self.graph is not None:
            qp = q.index_select(0, self.perm)
            out, lse = self.shared.run(qp, paged_kv_cache, return_lse=True)
            own, own_lse = self.own.run(qp, paged_kv_cache, return_lse=True)
            merge_state_in_place(out, lse, own, own_lse)
            return torch.empty_like(out).index_copy_(0, self.perm, out)
        if self.perm is None:
            return self.wrapper.run(q, paged_kv_cache)
        out = self.wrapper.run(q.index_select(0, self.perm), paged_kv_cache)
        return torch.empty_like(out).index_copy_(0, self.perm, out)

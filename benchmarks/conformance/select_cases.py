"""Order and split the sampled cases of a suite for the worker processes.

The sampling itself happens while pytest generates the parametrizations (``param_sampling``); here the
sampled cases are interleaved across test functions (round robin: a run cut short by its time budget
still has cases of every function) and split between processes, each function whole in one process
(its kernels then compile once).
"""
from __future__ import annotations

from collections import defaultdict


def interleave(cases: list[dict]) -> list[dict]:
    """Round robin over test functions, in-claim cases before excluded ones within each function."""
    queues: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for case in sorted(cases, key=lambda c: c.get("role") != "claim"):
        queues[(case["file"], case["function"])].append(case)
    ordered = [queues[k] for k in sorted(queues)]
    out: list[dict] = []
    for i in range(max((len(q) for q in ordered), default=0)):
        out += [q[i] for q in ordered if i < len(q)]
    return out


def shard(selected: list[dict], n: int) -> list[list[dict]]:
    """Splits the selection into ``n`` lists, each test function whole in one list, functions spread
    greedily by case count; each list keeps the order of ``selected``."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for case in selected:
        counts[(case["file"], case["function"])] += 1
    n = max(1, min(n, len(counts)))
    load = [0] * n
    home: dict[tuple[str, str], int] = {}
    for key in sorted(counts, key=lambda k: (-counts[k], k)):
        i = load.index(min(load))
        home[key] = i
        load[i] += counts[key]
    shards: list[list[dict]] = [[] for _ in range(n)]
    for case in selected:
        shards[home[(case["file"], case["function"])]].append(case)
    return shards

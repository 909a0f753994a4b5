"""Timing and peak-memory measurement shared by every study (CUDA events on GPU, wall clock on CPU)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn()`` in milliseconds.

    CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between runs, median). CPU: wall clock
    over at least 3 runs after one warm-up run, median.
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median device time of one ``fn()`` call replayed from a CUDA graph, in milliseconds.

    One call is captured (after two warm-up calls on a side stream, as capture requires); `do_bench`
    then times ``graph.replay`` with L2 flushed between replays. The replay is launched while the flush
    runs, so the figure is the call's kernels (and the gaps between them inside the graph) without the
    host's Python and launch cost: what the call costs inside a serving engine's captured step. ``fn``
    must be capturable (no host synchronisation, no generator read on the host); else this raises.
    """
    if device.type != "cuda":
        raise ValueError(f"graph_time_ms needs a CUDA device, got {device}")
    import triton.testing

    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        fn()
        fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    finally:
        # A capture that fails at its end (e.g. fn synchronised) can leave the capture stream current:
        # every later call of the study would then run on it.
        torch.cuda.set_stream(current)
    try:
        return float(triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    finally:
        del graph


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory allocated by one ``fn()`` call beyond what was live before it, in MiB.

    This covers the outputs and every temporary (e.g. a materialised score matrix). None on CPU.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20

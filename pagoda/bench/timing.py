"""Timing and peak-memory measurement shared by every study (CUDA events on GPU, a CPU clock on CPU)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

CPU_MIN_RUNS = 10     # CPU timing: at least this many timed calls, after CPU_WARMUP untimed ones,
CPU_WARMUP = 2
CPU_MAX_RUNS = 200    # and at most this many


def time_stats(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25,
               rep_ms: float = 100) -> tuple[float, float]:
    """(median time of ``fn()`` in ms, its spread): the spread is the interquartile range over the median.

    CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between runs); ``warmup_ms`` / ``rep_ms`` are
    its budgets. CPU: at least ``CPU_MIN_RUNS`` calls after ``CPU_WARMUP`` untimed ones, and more until
    ``rep_ms`` is spent, on `cpu_clock` (three runs of a millisecond-scale call read the scheduler, not the
    call).
    """
    if device.type == "cuda":
        import triton.testing

        times = [float(t) for t in triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")]
    else:
        for _ in range(CPU_WARMUP):
            fn()
        clock = time.thread_time if cpu_clock() == "thread CPU time" else time.perf_counter
        times = []
        deadline = time.perf_counter() + rep_ms / 1e3
        while len(times) < CPU_MIN_RUNS or (time.perf_counter() < deadline and len(times) < CPU_MAX_RUNS):
            t0 = clock()
            fn()
            times.append((clock() - t0) * 1e3)
    return statistics.median(times), spread(times)


def cpu_clock() -> str:
    """What CPU figures measure: with one intra-op thread (the bench CLI's CPU default) every op runs on the
    calling thread, and its CPU time is the call's cost whatever else the host runs (wall clock on a busy
    2-core host read the same call 10x apart); with more threads, wall clock."""
    return "thread CPU time" if torch.get_num_threads() == 1 else "wall clock"


def spread(times: list[float]) -> float:
    """Interquartile range over the median (0 for fewer than 4 samples)."""
    if len(times) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    med = statistics.median(times)
    return (q3 - q1) / med if med > 0 else 0.0


def time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn()`` in milliseconds (`time_stats` without the spread)."""
    return time_stats(fn, device, warmup_ms, rep_ms)[0]


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

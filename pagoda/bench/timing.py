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

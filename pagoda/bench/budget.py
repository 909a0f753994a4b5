"""Running a study under a wall-clock budget: the clock, a per-case time limit, failure reasons.

A benchmark run may be bounded in time (a CI job, a shared machine); a study that may not finish must still leave its
data. `Clock` says how long is left, `time_limit` interrupts one case that runs past its share (SIGALRM,
main thread), and the caller records the case as skipped/timed out and goes on.
"""
from __future__ import annotations

import contextlib
import gc
import signal
import threading
import time
from dataclasses import dataclass, field

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device) -> float:
    """Wall time (ms) of one call of ``fn``, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class CaseTimeout(Exception):
    """A case ran past its time limit (raised from SIGALRM between Python bytecodes)."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Interrupt the block after ``seconds`` (main thread on POSIX only; elsewhere no limit)."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"case exceeded its {seconds:.0f} s limit")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def reason(exc: BaseException) -> str:
    """One line for a report: exception type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def case_limit(budget_s: float | None) -> float:
    """A study's ``budget_s`` as seconds (inf for None); ValueError below 0."""
    if budget_s is not None and budget_s < 0:
        raise ValueError(f"budget_s must be >= 0, got {budget_s}")
    return float("inf") if budget_s is None else budget_s


def run_cases(cases: list, study: str, limit: float, run) -> tuple[list[dict], list[str]]:
    """``run(case)`` (a list of result rows) for each case under a progress bar, no case started once ``limit``
    seconds have passed (the first case that gives rows always runs), so a bounded run still leaves its data.
    Returns (the rows, the labels of the cases not run)."""
    from pagoda.bench.progress import Progress

    results: list[dict] = []
    start, skipped = time.monotonic(), []
    with Progress(len(cases), study) as bar:
        for case in cases:
            if results and time.monotonic() - start > limit:
                skipped.append(case.label())
            else:
                results += run(case)
            bar.step(case.label())
    return results, skipped


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(slots=True)
class Clock:
    """A wall-clock budget started at construction (``budget_s`` None = unlimited)."""
    budget_s: float | None
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self, reserve: float = 0.0) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - reserve - self.elapsed()

    def limit(self, cap: float | None, reserve: float = 0.0) -> float | None:
        """Seconds the next case may take: ``cap`` bounded by what is left (None: no limit at all)."""
        left = self.left(reserve)
        if cap is None:
            return None if left == float("inf") else left
        return min(cap, left)

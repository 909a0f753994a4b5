"""Which Triton kernels a stretch of code meets for the first time in the process, and what that costs.

Triton builds a kernel the first time a launch brings a new specialization (a new constexpr, an integer argument
that becomes 1 or stops dividing by 16, a new dtype): it compiles it (seconds) or loads it from Triton's disk
cache (milliseconds), inside the launch. A timed run that meets such a launch pays for it, and a warm-up that
misses it shows as a slow first run. `JitLog` records these events through Triton's runtime hooks
(``triton.knobs.runtime.jit_cache_hook`` before, ``jit_post_compile_hook`` after), chained to any hooks already
installed and restored on exit::

    with JitLog() as jit:
        run_the_workload()
    jit.count, jit.seconds, jit.summary()     # e.g. 3, 2.41, "_paged_prefill_kernel x2 (2.3 s), ..."

Where Triton has no such hooks (older than 3.4, or not installed: the reference path), ``available`` is False
and the counts stay 0.
"""
from __future__ import annotations

import time
from collections import defaultdict


class JitLog:
    """A context manager: ``events`` holds ``(kernel name, seconds)`` per kernel built on first use inside it."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []
        self.available = False
        self._runtime = None

    def __enter__(self) -> JitLog:
        try:
            from triton import knobs
            runtime = knobs.runtime
            prev_cache, prev_post = runtime.jit_cache_hook, runtime.jit_post_compile_hook
        except (ImportError, AttributeError):
            return self
        starts: dict[tuple[str, str], float] = {}

        def ident(kw) -> tuple[str, str]:
            fn = kw.get("fn")
            return getattr(fn, "name", None) or str(fn), str(kw.get("key"))

        def before(**kw):
            starts[ident(kw)] = time.perf_counter()
            # A truthy return tells Triton to skip the build: only a hook installed before ours may say so.
            return prev_cache(**kw) if prev_cache is not None else None

        def after(**kw):
            name, key = ident(kw)
            t0 = starts.pop((name, key), None)
            self.events.append((name, time.perf_counter() - t0 if t0 is not None else 0.0))
            return prev_post(**kw) if prev_post is not None else None

        self._runtime, self._prev = runtime, (prev_cache, prev_post)
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
        self.available = True
        return self

    def __exit__(self, *exc) -> None:
        if self._runtime is not None:
            self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook = self._prev
            self._runtime = None

    @property
    def count(self) -> int:
        return len(self.events)

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.events)

    def summary(self, top: int = 4) -> str:
        """The kernels that cost most, ``"name xN (S s)"``, most expensive first; "" when none."""
        by: dict[str, list[float]] = defaultdict(list)
        for name, s in self.events:
            by[name].append(s)
        ranked = sorted(by.items(), key=lambda kv: -sum(kv[1]))[:top]
        return ", ".join(f"{name} x{len(ss)} ({sum(ss):.2f} s)" for name, ss in ranked)

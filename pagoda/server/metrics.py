"""``GET /metrics``: Prometheus text through prometheus-client, vLLM's metric meanings under ``pagoda:``.

Each server owns its registry (several servers in one process, as tests start them, never collide).
Gauges about the engine (running / waiting requests, KV usage) are refreshed by the engine thread after
every step from ``engine_stats``; counters and latency histograms are fed by the engine loop as outputs
arrive (time to first token from the request's arrival, inter-token latency between a request's outputs).
The engine's steps are counted by kind with the engine thread's host and wait seconds (``pagoda:engine_*``):
what a load test reads to tell a host-bound server from a device-bound one.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

# Buckets as vLLM's (seconds): TTFT spans milliseconds to minutes, inter-token latency ms to seconds.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


# The engine loop's parts, in the order of `pagoda.server.engine_loop.LoopClock.as_tuple`.
LOOP_PARTS = ("idle", "commands", "steps", "handoff")


def engine_stats(engine: Any) -> dict[str, float]:
    """Running / waiting requests, KV-cache usage (0..1) and prefix-cache token counts of an ``LLMEngine``."""
    sched = engine.scheduler
    bm = sched.block_manager
    return {"running": float(len(sched.running)), "waiting": float(len(sched.waiting)), "kv_usage": bm.usage,
            "prefix_queries": float(bm.num_queried_tokens), "prefix_hits": float(bm.num_hit_tokens)}


def engine_snapshot(engine: Any, clock: Any = None) -> tuple[dict[str, float], tuple | None, tuple | None]:
    """What the metrics read of an engine after a step (small and picklable): ``engine_stats``, the step
    counters of ``engine.stats`` (steps, decode steps, graph steps, host s, wait s, decode host s, decode wait s;
    None without ``stats``) and the engine loop's seconds by part (`pagoda.server.engine_loop.LoopClock`, None
    without one)."""
    st = getattr(engine, "stats", None)
    steps = None if st is None else (st.steps, st.decode_steps, st.graph_steps, st.host_s, st.wait_s,
                                     st.decode_host_s, st.decode_wait_s)
    return engine_stats(engine), steps, None if clock is None else clock.as_tuple()


def observe_many(hist: Any, values: list[float]) -> None:
    """``hist.observe(v)`` for each of ``values`` (a prometheus-client histogram child), with one update per bucket
    touched instead of a locked update per value and bucket: the server observes a step's inter-token latencies
    (one per running stream) at once. Falls back to ``observe`` where the histogram's layout is not the one read."""
    if not values:
        return
    bounds, buckets, total = (getattr(hist, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            hist.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect_left(bounds, v)         # the first bucket with v <= its bound, as observe() picks
        counts[i] = counts.get(i, 0) + 1
    total.inc(sum(values))
    for i, n in counts.items():
        buckets[i].inc(n)


class ServerMetrics:
    """The server's metrics in a private registry; ``render()`` gives the Prometheus text."""

    def __init__(self, model_name: str):
        self.registry = reg = CollectorRegistry()
        # The server process's CPU seconds (process_cpu_seconds_total, on Linux): near one a second means its
        # one interpreter is the bottleneck (`pagoda bench serve` reports it over the run).
        ProcessCollector(registry=reg)
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(f"pagoda:{name}", doc, labels, registry=reg).labels(model_name)

        def counter(name, doc):
            return Counter(f"pagoda:{name}", doc, labels, registry=reg).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(f"pagoda:{name}", doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests in the engine's running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = full).")
        self.prefix_cache_hit_rate = gauge("prefix_cache_hit_rate",
                                           "Prompt tokens served from the prefix cache / prompt tokens, so far.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of accepted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.requests_finished = Counter("pagoda:request_success", "Finished requests by finish reason.",
                                         ["model_name", "finished_reason"], registry=reg)
        self._model_name = model_name
        self._seen = (0.0, 0.0)
        # The engine's steps (`LLMEngine.stats`): how many of each kind, how many replayed a CUDA graph, and the
        # engine thread's seconds in them outside the wait for the device (host) and in it (wait). A decode
        # step carries no prompt tokens; a prefill step carries some (with or without decode rows).
        kind = ["model_name", "kind"]
        self.engine_steps = Counter("pagoda:engine_steps", "Engine steps by kind (decode: no prompt tokens).",
                                    kind, registry=reg)
        self.engine_graph_steps = counter("engine_graph_steps", "Engine steps replayed from a CUDA graph.")
        self.engine_step_host = Counter("pagoda:engine_step_host_seconds",
                                        "Engine thread seconds in steps outside the wait for the device.", kind,
                                        registry=reg)
        self.engine_step_wait = Counter("pagoda:engine_step_wait_seconds",
                                        "Engine thread seconds in steps waiting for the device's tokens.", kind,
                                        registry=reg)
        self._steps_seen = (0, 0, 0, 0.0, 0.0, 0.0, 0.0)
        self.engine_loop = Counter("pagoda:engine_loop_seconds",
                                   "Engine loop seconds by part: idle (nothing to run), commands (adds, aborts), "
                                   "steps, handoff (a step's outputs to the server).", ["model_name", "part"],
                                   registry=reg)
        self._loop_seen = (0.0, 0.0, 0.0, 0.0)
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Time from a request's arrival to its first token.", _TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Time between a request's consecutive outputs.", _ITL_BUCKETS)
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.",
                                     _E2E_BUCKETS)

    def observe_engine(self, engine: Any, clock: Any = None) -> None:
        """Called by the engine thread after each step (prometheus-client metrics are thread-safe)."""
        self.observe(*engine_snapshot(engine, clock))

    def observe(self, stats: dict[str, float], steps: tuple | None, loop: tuple | None = None) -> None:
        """Update from an ``engine_snapshot``: taken here (engine thread) or in the engine's own process."""
        self.num_requests_running.set(stats["running"])
        self.num_requests_waiting.set(stats["waiting"])
        self.kv_cache_usage.set(stats["kv_usage"])
        # The engine keeps running totals; the counters take the increase since the last step.
        dq, dh = stats["prefix_queries"] - self._seen[0], stats["prefix_hits"] - self._seen[1]
        if dq > 0 or dh > 0:
            self.prefix_cache_queries.inc(max(dq, 0.0))
            self.prefix_cache_hits.inc(max(dh, 0.0))
            self._seen = (stats["prefix_queries"], stats["prefix_hits"])
        self._observe_steps(steps)
        if loop is not None and loop != self._loop_seen:
            for part, a, b in zip(LOOP_PARTS, loop, self._loop_seen, strict=True):
                if a > b:
                    self.engine_loop.labels(self._model_name, part).inc(a - b)
            self._loop_seen = loop

    def _observe_steps(self, now: tuple | None) -> None:
        if now is None or now == self._steps_seen:
            return
        seen = self._steps_seen
        if any(a < b for a, b in zip(now, seen, strict=True)):    # new counters (engine.stats replaced): from 0
            seen = (0,) * len(now)
        steps, dec, graph, host, wait, dhost, dwait = (a - b for a, b in zip(now, seen, strict=True))
        self._steps_seen = now
        m = self._model_name
        if dec:
            self.engine_steps.labels(m, "decode").inc(dec)
            self.engine_step_host.labels(m, "decode").inc(dhost)
            self.engine_step_wait.labels(m, "decode").inc(dwait)
        if steps > dec:
            self.engine_steps.labels(m, "prefill").inc(steps - dec)
            self.engine_step_host.labels(m, "prefill").inc(max(host - dhost, 0.0))
            self.engine_step_wait.labels(m, "prefill").inc(max(wait - dwait, 0.0))
        if graph:
            self.engine_graph_steps.inc(graph)

    def finished(self, reason: str | None) -> None:
        self.requests_finished.labels(self._model_name, reason or "unknown").inc()

    def render(self) -> bytes:
        queries = self.prefix_cache_queries._value.get()
        self.prefix_cache_hit_rate.set(self.prefix_cache_hits._value.get() / queries if queries else 0.0)
        return generate_latest(self.registry)

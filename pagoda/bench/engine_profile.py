"""``pagoda bench engine --profile``: where a decode step at full batch spends its time.

The engine benchmark's requests (`pagoda.bench.engine.make_requests`), every output long enough that all of them
are decoding together; once every prompt is prefilled, ``torch.profiler`` records ``steps`` engine steps. Figures:
wall time per step, the device's busy time per step (the sum of its kernels' and copies' own times: an upper
bound on what the host could hide), the host's share of the step (1 - busy / wall), the kernels by device time and
the host-side operators by their own CPU time; then, without the profiler, the same number of steps timed by
phase of `pagoda.LLMEngine.step` (scheduling, input building and launch, sampling, the wait for the previous
step's tokens, their processing): where the host's part of a step goes.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch

from pagoda.bench import report as _report

_sig = _report.significant


def _dev_time(evt) -> float:
    """An event's own device time, µs (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_decode(model_dir: str, cfg, load_format: str, steps: int = 12) -> dict:
    from pagoda.bench.engine import make_requests
    from pagoda.engine import EngineConfig, LLMEngine, RequestOutputKind, SamplingParams

    engine = LLMEngine(EngineConfig(model=model_dir, load_format=load_format, dtype=cfg.dtype, seed=cfg.seed,
                                    max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
                                    gpu_memory_utilization=cfg.gpu_memory_utilization))
    requests = make_requests(cfg)
    params = SamplingParams(temperature=cfg.temperature, ignore_eos=True, max_tokens=steps + 64,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for j, (p, _) in enumerate(requests):
        engine.add_request(str(j), {"prompt_token_ids": p[:cfg.max_model_len - steps - 80]}, params)
    while engine.scheduler.waiting or engine.stats.decode_steps < 4:
        engine.step()
    running = len(engine.scheduler.running)
    cuda = engine.model_runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sync()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    kernels = sorted((e for e in events if _dev_time(e) > 0), key=_dev_time, reverse=True)
    busy = sum(_dev_time(e) for e in kernels) / steps / 1e6
    host_ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [dict(kind="step", name=f"decode step, {running} running", calls=steps, ms_per_step=_sig(1e3 * wall),
                 device_busy_ms=_sig(1e3 * busy), host_share=_sig(max(0.0, 1 - busy / wall)))]
    rows += [dict(kind="kernel", name=e.key[:90], calls=e.count, ms_per_step=_sig(_dev_time(e) / steps / 1e3))
             for e in kernels[:20]]
    rows += [dict(kind="host op", name=e.key[:90], calls=e.count,
                  ms_per_step=_sig(e.self_cpu_time_total / steps / 1e3)) for e in host_ops[:20]]
    phases = _phase_times(engine, steps)
    rows += [dict(kind="host phase", name=name, calls=steps, ms_per_step=_sig(1e3 * t / steps))
             for name, t in phases.items()]
    while engine.has_unfinished_requests():
        engine.abort_request(list(engine.requests))
    return dict(running=running, steps=steps, wall_ms=1e3 * wall, busy_ms=1e3 * busy, rows=rows)


def _phase_times(engine, steps: int) -> Counter:
    """Seconds spent in each phase of ``steps`` engine steps (methods wrapped with timers for the duration)."""
    times: Counter = Counter()
    runner, sched = engine.model_runner, engine.scheduler
    targets = [(sched, "schedule", "schedule"), (runner, "launch", "inputs + launch"), (runner, "sample", "sample"),
               (sched, "update_after_step", "update"), (engine, "_process", "process tokens"),
               (sched, "cache_blocks", "cache blocks")]

    def timed(fn, name):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] += time.perf_counter() - t0
        return wrapper

    with contextlib.ExitStack() as stack:
        for obj, attr, name in targets:
            setattr(obj, attr, timed(getattr(obj, attr), name))
            stack.callback(delattr, obj, attr)        # back to the class's method
        wait0 = engine.stats.decode_wait_s
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - t0
    times["wait for tokens"] = engine.stats.decode_wait_s - wait0
    times["step (all)"] = total
    return times


def tables(report: dict, markdown: bool = False) -> str:
    cols = ["kind", "name", "calls", "ms_per_step", "device_busy_ms", "host_share"]
    rows = report["results"]
    fmt = _report.markdown_table if markdown else _report.format_table
    return fmt(cols, [[r.get(k) for k in cols] for r in rows])

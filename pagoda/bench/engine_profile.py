"""``pagoda bench engine --profile``: where a step of the engine benchmark spends its time.

The engine benchmark's requests (`pagoda.bench.engine.make_requests`), every output long enough that all of them
are decoding together, after a warm-up on other prompts (every kernel shape compiled). First the prefill: the
first ``prefill_steps`` steps (chunks of ``max_num_batched_tokens`` prompt tokens) under ``torch.profiler``, then
every step until no prompt waits, timed by phase. Then, once every prompt is prefilled, ``steps`` decode steps
under ``torch.profiler`` and again timed by phase. Figures for each: wall time per step, the device's busy time
per step (the sum of its kernels' and copies' own times: an upper bound on what the host could hide), the
host's share of the step (1 - busy / wall), the kernels by device time and the host-side operators by their own
CPU time, and the phases of `pagoda.LLMEngine.step` (scheduling, input building and launch, sampling, the wait
for the previous step's tokens, their processing): where the host's part of a step goes. A few more steps of each
kind run under ``cProfile`` (rows ``prefill python`` and ``host python``): the Python functions with the most
time of their own, which names the host time that no operator accounts for (cProfile slows Python down, so
read the shares, not the milliseconds). On CUDA, last and
untimed, a few steps with new prompts beside the running decodes run under CUDA's sync debug mode: every
synchronising operation is counted by the source line that called it (rows ``sync``), which names a wait for
the device a step should not have.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

from pagoda.bench import report as _report

_sig = _report.significant
SYNC_STEPS = 6
PYTHON_STEPS = 2
PYTHON_ROWS = 15


def _dev_time(evt) -> float:
    """An event's own device time, µs (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_decode(model_dir: str, cfg, load_format: str, steps: int = 12, prefill_steps: int = 3) -> dict:
    from pagoda.bench.engine import make_requests
    from pagoda.engine import EngineConfig, LLMEngine, RequestOutputKind, SamplingParams

    engine = LLMEngine(EngineConfig(model=model_dir, load_format=load_format, dtype=cfg.dtype, seed=cfg.seed,
                                    max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
                                    gpu_memory_utilization=cfg.gpu_memory_utilization))
    requests = make_requests(cfg)
    params = SamplingParams(temperature=cfg.temperature, ignore_eos=True, max_tokens=steps + 64,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    warm = make_requests(type(cfg)(**{**vars(cfg), "seed": cfg.seed + 1}))[:min(32, len(requests))]
    for j, (p, _) in enumerate(warm):
        engine.add_request(f"w{j}", {"prompt_token_ids": p[:cfg.max_model_len - 8]}, params.clone())
    while engine.has_unfinished_requests():
        engine.step()
    engine.block_manager.reset_prefix_cache()
    for j, (p, _) in enumerate(requests):
        engine.add_request(str(j), {"prompt_token_ids": p[:cfg.max_model_len - steps - 80]}, params)
    cuda = engine.model_runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    tokens0 = engine.stats.tokens
    first = _profiled(engine, prefill_steps, sync, cuda)
    py_pre, n_py = (_python_profile(engine, PYTHON_STEPS, sync) if engine.scheduler.waiting else ([], 0))
    rest = _phase_times(engine, None, until=lambda: not engine.scheduler.waiting)
    n_pre = prefill_steps + n_py + rest.pop("steps")
    rows += _rows(first, f"prefill step, {(engine.stats.tokens - tokens0) // max(n_pre, 1)} tokens", "prefill ")
    n_rest = n_pre - prefill_steps - n_py
    rows += [dict(kind="prefill phase", name=name, calls=n_rest, ms_per_step=_sig(1e3 * t / max(n_rest, 1)))
             for name, t in rest.items()]
    rows += [dict(kind="prefill python", **r) for r in py_pre]
    while engine.stats.decode_steps < 4 or any(s.is_prefill for s in engine.scheduler.running):
        engine.step()
    running = len(engine.scheduler.running)
    decode = _profiled(engine, steps, sync, cuda)
    rows = _rows(decode, f"decode step, {running} running", "") + rows
    phases = _phase_times(engine, steps)
    phases.pop("steps")
    rows += [dict(kind="host phase", name=name, calls=steps, ms_per_step=_sig(1e3 * t / steps))
             for name, t in phases.items()]
    py_dec, _ = _python_profile(engine, PYTHON_STEPS, sync)
    rows += [dict(kind="host python", **r) for r in py_dec]
    if cuda:      # untimed: a few mixed steps (new prompts beside the running decodes), then decode steps
        for j, (p, _) in enumerate(warm[:4]):
            engine.add_request(f"s{j}", {"prompt_token_ids": p[:cfg.max_model_len - 8]}, params.clone())
        syncs = _count_syncs(engine, SYNC_STEPS)
        rows += [dict(kind="sync", name=where, calls=n) for where, n in syncs.most_common(12)]
    while engine.has_unfinished_requests():
        engine.abort_request(list(engine.requests))
    return dict(running=running, steps=steps, prefill_steps=n_pre, wall_ms=decode["wall_ms"],
                busy_ms=decode["busy_ms"], rows=rows)


def _profiled(engine, steps: int, sync, cuda: bool) -> dict:
    """``steps`` engine steps under ``torch.profiler``: wall and device-busy ms per step, the profiler's events."""
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
    return dict(steps=steps, wall_ms=1e3 * wall, busy_ms=1e3 * busy, kernels=kernels, host_ops=host_ops)


def _python_profile(engine, steps: int, sync) -> tuple[list[dict], int]:
    """``steps`` engine steps under ``cProfile``: the `PYTHON_ROWS` functions with the most time of their own
    (``name``: function, file and line; ``calls`` over the steps; ``ms_per_step`` of own time, cProfile's
    overhead included), and how many steps ran."""
    import cProfile
    import pstats

    sync()
    prof = cProfile.Profile()
    n = 0
    prof.enable()
    try:
        while n < steps and engine.has_unfinished_requests():
            engine.step()
            n += 1
        sync()
    finally:
        prof.disable()
    stats = pstats.Stats(prof).stats          # (file, line, function) -> (calls, primitive calls, own, cumulative)
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:PYTHON_ROWS]
    return [dict(name=f"{fn} ({Path(file).name}:{line})"[:90], calls=nc,
                 ms_per_step=_sig(1e3 * own / max(n, 1))) for (file, line, fn), (_, nc, own, *_) in top], n


def _rows(p: dict, title: str, prefix: str) -> list[dict]:
    steps, wall, busy = p["steps"], p["wall_ms"], p["busy_ms"]
    rows = [dict(kind=prefix + "step", name=title, calls=steps, ms_per_step=_sig(wall), device_busy_ms=_sig(busy),
                 host_share=_sig(max(0.0, 1 - busy / wall)) if wall > 0 else None)]
    rows += [dict(kind=prefix + "kernel", name=e.key[:90], calls=e.count, ms_per_step=_sig(_dev_time(e) / steps / 1e3))
             for e in p["kernels"][:20]]
    rows += [dict(kind=prefix + "host op", name=e.key[:90], calls=e.count,
                  ms_per_step=_sig(e.self_cpu_time_total / steps / 1e3)) for e in p["host_ops"][:20]]
    return rows


def _count_syncs(engine, steps: int) -> Counter:
    """``steps`` engine steps under CUDA's sync debug mode: every synchronising operation, counted by the source
    line that called it (a wait for the device a step should not have shows up here)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                   if "synchroniz" in str(w.message).lower())


def _phase_times(engine, steps: int | None, until=None) -> Counter:
    """Seconds spent in each phase of ``steps`` engine steps, or of the steps run until ``until()`` is true
    (methods wrapped with timers for the duration); ``"steps"``: how many ran."""
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
        wait0 = engine.stats.wait_s
        t0 = time.perf_counter()
        n = 0
        while (n < steps) if steps is not None else not until():
            engine.step()
            n += 1
        total = time.perf_counter() - t0
    times["steps"] = n
    times["wait for tokens"] = engine.stats.wait_s - wait0
    times["step (all)"] = total
    return times


def tables(report: dict, markdown: bool = False) -> str:
    cols = ["kind", "name", "calls", "ms_per_step", "device_busy_ms", "host_share"]
    rows = report["results"]
    fmt = _report.markdown_table if markdown else _report.format_table
    return fmt(cols, [[r.get(k) for k in cols] for r in rows])

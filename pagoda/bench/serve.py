"""``pagoda bench serve``: a load generator for an OpenAI-compatible server, as vLLM's serving benchmark.

Random requests (prompt token ids drawn uniformly from the vocabulary, input and output lengths uniform in
``[L * (1 - range_ratio), L * (1 + range_ratio)]``, ``ignore_eos`` so every request generates exactly its
output length), sent as streaming ``/v1/completions`` calls over HTTP (httpx, asyncio) either at a request
rate (Poisson arrivals; ``inf`` = all at once) and/or under a concurrency cap. Reported as vLLM does:
requests/s, output and total tokens/s, time to first token (TTFT), time per output token after the first
(TPOT), inter-token latency between streamed chunks (ITL) and end-to-end latency: mean, median, p99. Against
``pagoda serve``, also the engine's steps during the run, from its ``/metrics`` before and after: decode and
prefill steps, those replayed from CUDA graphs, and each kind's mean host and wait time (``--offline``: the
same from the engine's own counters), which tell the HTTP layer's cost from the engine's.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pagoda.bench.stats import percentile


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None                 # None: the first model of GET /v1/models
    api_key: str | None = None
    num_prompts: int = 1000
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    vocab_size: int = 32000                  # prompt ids are drawn from [0, vocab_size)
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    seed: int = 0
    warmup: int = 1                          # requests sent (and waited for) before timing starts

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive (inf: all at once), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int                          # asked for
    ok: bool = False
    error: str | None = None
    output_tokens: int = 0                   # the server's usage count
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def sample_requests(cfg: ServeBenchConfig) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, reproducible from ``cfg.seed``."""
    rng = random.Random(cfg.seed)

    def length(mean: int) -> int:
        lo, hi = max(1, int(mean * (1 - cfg.range_ratio))), max(1, int(mean * (1 + cfg.range_ratio)))
        return rng.randint(lo, hi)

    return [([rng.randrange(cfg.vocab_size) for _ in range(length(cfg.input_len))], length(cfg.output_len))
            for _ in range(cfg.num_prompts)]


_STEP_COUNTERS = {"pagoda:engine_steps_total": "steps", "pagoda:engine_step_host_seconds_total": "host_s",
                  "pagoda:engine_step_wait_seconds_total": "wait_s", "pagoda:engine_graph_steps_total": "graph_steps",
                  "pagoda:engine_loop_seconds_total": "loop_s"}


def engine_counters(text: str) -> dict[tuple[str, str], float]:
    """pagoda's engine-step counters from a ``/metrics`` page: ``{(field, kind): value}`` (kind: the ``kind`` or
    ``part`` label, "" when the counter has none); empty for a server without them."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("process_cpu_seconds_total "):      # the server process's CPU (no labels)
            out[("server_cpu_s", "")] = float(line.split()[1])
            continue
        name, _, rest = line.partition("{")
        field = _STEP_COUNTERS.get(name)
        if field is None or "} " not in rest:
            continue
        labels, _, value = rest.rpartition("} ")
        kind = next((x.split("=", 1)[1].strip('"') for x in labels.split(",") if x.startswith(("kind=", "part="))),
                    "")
        out[(field, kind)] = out.get((field, kind), 0.0) + float(value)
    return out


def step_summary(steps: dict[str, float], host_s: dict[str, float], wait_s: dict[str, float],
                 graph_steps: float) -> dict:
    """Steps of each kind ("decode", "prefill") and their mean host and wait milliseconds."""
    out: dict = {"graph_steps": int(graph_steps)}
    for kind in ("decode", "prefill"):
        n = steps.get(kind, 0)
        out[f"{kind}_steps"] = int(n)
        out[f"{kind}_host_ms"] = 1e3 * host_s.get(kind, 0.0) / n if n else None
        out[f"{kind}_wait_ms"] = 1e3 * wait_s.get(kind, 0.0) / n if n else None
    return out


def _counter_delta(before: dict, after: dict) -> dict | None:
    if not after:
        return None
    d = {k: after[k] - before.get(k, 0.0) for k in after}

    def by_kind(field):
        return {kind: v for (f, kind), v in d.items() if f == field}

    out = step_summary(by_kind("steps"), by_kind("host_s"), by_kind("wait_s"), d.get(("graph_steps", ""), 0.0))
    loop = by_kind("loop_s")
    if loop:
        out["loop_s"] = {part: round(loop.get(part, 0.0), 3) for part in ("steps", "handoff", "commands", "idle")}
    if ("server_cpu_s", "") in d:
        out["server_cpu_s"] = round(d[("server_cpu_s", "")], 3)
    return out


async def _scrape(client) -> dict:
    try:
        r = await client.get("/metrics")
        return engine_counters(r.text) if r.status_code == 200 else {}
    except Exception:      # a server without /metrics: the report has no engine section
        return {}


async def _one(client, cfg: ServeBenchConfig, model: str, ids: list[int], out_len: int) -> RequestResult:
    res = RequestResult(len(ids), out_len)
    body = {"model": model, "prompt": ids, "max_tokens": out_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                now = time.perf_counter()
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", ())):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = time.perf_counter() - start
        res.ok = res.output_tokens > 0
        if not res.ok:
            res.error = "no tokens"
    except Exception as exc:  # a failed request is counted, not fatal (as vLLM's benchmark)
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def _run(cfg: ServeBenchConfig) -> tuple[list[RequestResult], float, str, dict | None]:
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limit = cfg.max_concurrency or cfg.num_prompts
    tls = ssl.create_default_context()      # one context for every client (each would load the CA bundle)

    def client(connections: int):
        return httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=httpx.Timeout(None), verify=tls,
                                 limits=httpx.Limits(max_connections=connections,
                                                     max_keepalive_connections=connections))

    # One client of one connection per request in flight: an httpx pool of N connections rescans all of them
    # on every request and response event, so at 256 streams the load generator, not the server, was the
    # bottleneck (a whole core at ~5,000 chunks/s). The queue of clients is also the concurrency cap.
    clients = [client(1) for _ in range(limit)]
    pool: asyncio.Queue = asyncio.Queue()
    for one in clients:
        pool.put_nowait(one)
    async with contextlib.AsyncExitStack() as stack:
        for one in clients:                      # closed on every way out (an error, a cancel)
            await stack.enter_async_context(one)
        c = await stack.enter_async_context(client(2))
        model = cfg.model
        if model is None:
            r = await c.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        reqs = sample_requests(cfg)
        for ids, _ in reqs[:cfg.warmup]:
            warm = await _one(c, cfg, model, ids, 4)
            if not warm.ok:
                raise RuntimeError(f"the warm-up request failed: {warm.error}")
        rng = random.Random(cfg.seed + 1)

        async def limited(ids, n):
            own = await pool.get()
            try:
                return await _one(own, cfg, model, ids, n)
            finally:
                pool.put_nowait(own)

        tasks = []
        before = await _scrape(c)
        start = time.perf_counter()
        for ids, n in reqs:
            tasks.append(asyncio.create_task(limited(ids, n)))
            if cfg.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        steps = _counter_delta(before, await _scrape(c))
        return results, duration, model, steps


def run_offline(cfg: ServeBenchConfig, model_dir: str, **engine_kwargs) -> dict:
    """The same requests through ``LLMEngine`` in this process, no HTTP: the figure the server is held to.

    ``max_num_seqs`` defaults to ``cfg.max_concurrency`` (the same number of requests in flight)."""
    import datetime as dt

    from pagoda.engine.llm_engine import LLMEngine, StepStats
    from pagoda.engine.sampling_params import RequestOutputKind, SamplingParams

    if cfg.max_concurrency is not None:
        engine_kwargs["max_num_seqs"] = cfg.max_concurrency
    engine = LLMEngine.from_kwargs(model_dir, **engine_kwargs)
    reqs = sample_requests(cfg)

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)

    for i, (ids, _) in enumerate(reqs[:cfg.warmup]):
        engine.add_request(f"warmup-{i}", {"prompt_token_ids": ids}, params(4))
    while engine.has_unfinished_requests():
        engine.step()
    engine.stats = StepStats()
    start = time.perf_counter()
    for i, (ids, n) in enumerate(reqs):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params(n))
    out_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            out_tokens += sum(len(c.token_ids) for c in out.outputs)
    duration = time.perf_counter() - start
    st = engine.stats
    steps = step_summary({"decode": st.decode_steps, "prefill": st.steps - st.decode_steps},
                         {"decode": st.decode_host_s, "prefill": st.host_s - st.decode_host_s},
                         {"decode": st.decode_wait_s, "prefill": st.wait_s - st.decode_wait_s}, st.graph_steps)
    in_tokens = sum(len(ids) for ids, _ in reqs)
    config = {k: (None if v == float("inf") else v) for k, v in asdict(cfg).items() if k != "api_key"}
    return {"study": "serve-offline",
            "meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": model_dir,
                     "engine": {k: v for k, v in engine_kwargs.items() if v is not None}},
            "config": config,
            "results": {"completed": len(reqs), "duration_s": duration, "total_input_tokens": in_tokens,
                        "total_output_tokens": out_tokens, "request_throughput": len(reqs) / duration,
                        "output_throughput": out_tokens / duration,
                        "total_token_throughput": (in_tokens + out_tokens) / duration, "engine": steps}}


def _pct(values: list[float], q: float) -> float:
    return percentile(values, q) or 0.0


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    ms = 1000.0

    def stats(name: str, values: list[float]) -> dict:
        return {f"mean_{name}_ms": sum(values) / len(values) * ms if values else 0.0,
                f"median_{name}_ms": _pct(values, 50) * ms, f"p99_{name}_ms": _pct(values, 99) * ms}

    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
            "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
            "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
            "total_token_throughput": (in_tokens + out_tokens) / duration,
            **stats("ttft", [r.ttft for r in ok]), **stats("tpot", tpot),
            **stats("itl", [x for r in ok for x in r.itl]), **stats("e2el", [r.latency for r in ok]),
            "errors": sorted({r.error for r in results if r.error})[:10]}


def run(cfg: ServeBenchConfig) -> dict:
    """Run the benchmark against ``cfg.base_url``; the report dict (``study``, ``meta``, ``config``, ``results``)."""
    import datetime as dt
    import platform

    results, duration, model, steps = asyncio.run(_run(cfg))
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["pagoda"] + sys.argv[1:]) if "pagoda" in sys.argv[0] else " ".join(sys.argv),
            "python": platform.python_version(), "model": model}
    config = {k: (None if v == float("inf") else v) for k, v in asdict(cfg).items() if k != "api_key"}
    return {"study": "serve", "meta": meta, "config": config,
            "results": {**summarize(results, duration), "engine": steps}}


_ROWS = [("Successful requests", "completed", "{:d}"), ("Failed requests", "failed", "{:d}"),
         ("Benchmark duration (s)", "duration_s", "{:.2f}"), ("Total input tokens", "total_input_tokens", "{:d}"),
         ("Total generated tokens", "total_output_tokens", "{:d}"),
         ("Request throughput (req/s)", "request_throughput", "{:.2f}"),
         ("Output token throughput (tok/s)", "output_throughput", "{:.2f}"),
         ("Total token throughput (tok/s)", "total_token_throughput", "{:.2f}")]


def _engine_rows(eng: dict | None) -> list[tuple[str, str]]:
    """The engine's steps during the run (the server's ``/metrics``, or the offline engine's stats)."""
    if not eng:
        return []
    rows = [("Engine decode / prefill steps", f"{eng['decode_steps']} / {eng['prefill_steps']}"),
            ("Engine steps from CUDA graphs", f"{eng['graph_steps']}")]
    for kind in ("decode", "prefill"):
        if eng.get(f"{kind}_host_ms") is not None:
            rows.append((f"{kind.capitalize()} step host / wait (ms)",
                         f"{eng[f'{kind}_host_ms']:.2f} / {eng[f'{kind}_wait_ms']:.2f}"))
    if eng.get("loop_s"):
        loop = eng["loop_s"]
        rows.append(("Engine loop steps / hand-off / commands / idle (s)",
                     " / ".join(f"{loop[p]:.2f}" for p in ("steps", "handoff", "commands", "idle"))))
    if eng.get("server_cpu_s") is not None:
        rows.append(("Server process CPU (s)", f"{eng['server_cpu_s']:.2f}"))
    return rows


def tables(report: dict, markdown: bool = False) -> str:
    res, cfg = report["results"], report["config"]
    rows = [(label, fmt.format(res[key])) for label, key, fmt in _ROWS if key in res]
    if report["study"] == "serve-offline":
        head = (f"offline engine (no HTTP): {report['meta']['model']}, {cfg['num_prompts']} requests, input "
                f"{cfg['input_len']} / output {cfg['output_len']} tokens (range ratio {cfg['range_ratio']}), "
                f"max_num_seqs {cfg['max_concurrency'] or 'default'}")
        rows += _engine_rows(res.get("engine"))
        if markdown:
            return "\n".join([f"**{head}**", "", "| metric | value |", "|---|---|"]
                             + [f"| {a} | {b} |" for a, b in rows])
        return "\n".join([head, "-" * len(head)] + [f"{a:<32}  {b:>12}" for a, b in rows])
    for name, title in (("ttft", "Time to first token"), ("tpot", "Time per output token (excl. 1st)"),
                        ("itl", "Inter-token latency"), ("e2el", "End-to-end latency")):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{title}: {stat} (ms)", f"{res[f'{stat}_{name}_ms']:.2f}"))
    rows += _engine_rows(res.get("engine"))
    head = (f"serve benchmark: {report['meta']['model']} at {cfg['base_url']}, {cfg['num_prompts']} requests, "
            f"input {cfg['input_len']} / output {cfg['output_len']} tokens (range ratio {cfg['range_ratio']}), "
            f"request rate {cfg['request_rate'] or 'inf'}, max concurrency {cfg['max_concurrency'] or 'none'}")
    if markdown:
        return "\n".join([f"**{head}**", "", "| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])
    width = max(len(a) for a, _ in rows)
    return "\n".join([head, "-" * len(head)] + [f"{a:<{width}}  {b:>12}" for a, b in rows]
                     + ([f"errors: {res['errors']}"] if res["errors"] else []))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagoda bench serve", description=__doc__.split("\n\n")[0])
    d = ServeBenchConfig()
    p.add_argument("--base-url", default=d.base_url, help=f"server address (default: {d.base_url})")
    p.add_argument("--model", help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts, help=f"requests (default: {d.num_prompts})")
    p.add_argument("--input-len", type=int, default=d.input_len, help=f"mean prompt tokens (default: {d.input_len})")
    p.add_argument("--output-len", type=int, default=d.output_len,
                   help=f"mean generated tokens, EOS ignored (default: {d.output_len})")
    p.add_argument("--range-ratio", type=float, default=d.range_ratio,
                   help="lengths uniform in [L*(1-r), L*(1+r)] (default: 0, fixed lengths)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"prompt token ids drawn from [0, V) (default: {d.vocab_size})")
    p.add_argument("--request-rate", type=float, default=d.request_rate,
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no cap)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed requests first (default: 1)")
    p.add_argument("--out", help="directory for serve.json and serve.md (serve-offline.* with --offline)")
    p.add_argument("--offline", metavar="MODEL_DIR",
                   help="run the same requests through the engine in this process (no server, no HTTP) with the "
                        "engine options below; max_num_seqs = --max-concurrency when given")
    from pagoda.server.cli_args import add_engine_arguments
    add_engine_arguments(p.add_argument_group("engine (with --offline; --seed is shared)"), skip=("--seed",))
    return p


def main(argv: list[str] | None = None) -> int:
    from pagoda.server.cli_args import ENGINE_ARG_NAMES, engine_kwargs

    args = build_parser().parse_args(argv)
    skip = {"out", "offline", *ENGINE_ARG_NAMES} - {"seed"}
    cfg = ServeBenchConfig(**{k: v for k, v in vars(args).items() if k not in skip})
    report = run_offline(cfg, args.offline, **engine_kwargs(args)) if args.offline else run(cfg)
    print(tables(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = report["study"]
        (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{name}.md").write_text(tables(report, markdown=True) + "\n")
        print(f"\nwrote {out / (name + '.json')}, {out / (name + '.md')}")
    return 0 if report["results"]["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pagoda.bench.serve_sim``: what the HTTP layer costs, without a GPU.

`pagoda serve`'s application (`pagoda.server.app.build_app`, uvicorn, the engine loop) over a simulated engine, in a
process of its own as `pagoda serve` runs it (``--engine-thread``: in a thread of the server's process, sharing its
GIL), loaded by `pagoda bench serve` from a child process (its own interpreter, as a real client), streaming
``/v1/completions`` at each concurrency. The simulated engine has `LLMEngine`'s step-level interface: each step
spends ``host_ms`` of Python on the engine's thread (holding its GIL, as scheduling, input building and output
processing do), then waits off the GIL until ``device_ms`` have passed (as the wait for the GPU's tokens does), and
gives one token to every running request. Alone it would run a step every ``max(host_ms, device_ms)``, so ``clients
/ step`` tokens/s is the ceiling; the ratio to it is the HTTP layer's share of the serving cost: the event loop's
per-token work competing with the engine thread for the GIL, and the load generator's own cost.

Figures per concurrency: output tokens/s, the ceiling and the fraction of it, the engine's mean step period,
the server process's CPU seconds over the timed run's seconds (near 1: its one interpreter is the bottleneck), the
median time per output token.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from pagoda.bench import report as _report


@dataclass
class SimConfig:
    host_ms: float = 2.5          # engine-thread Python per step (GIL held)
    device_ms: float = 7.0        # the step's period if the host took no time (GIL free while waiting)
    clients: tuple = (64, 256)
    num_prompts: int = 1024
    input_len: int = 8
    output_len: int = 128
    timeout_s: float = 1800.0     # the load generator's run, at most (a wedged server must not hang the caller)
    engine_process: bool = True   # the engine in its own process (pagoda serve's default), or a server thread

    def __post_init__(self):
        if self.host_ms < 0 or self.device_ms <= 0:
            raise ValueError(f"need host_ms >= 0 and device_ms > 0, got {self.host_ms}, {self.device_ms}")
        if not self.clients or min(self.clients) < 1:
            raise ValueError(f"clients must be positive counts, got {self.clients}")


class _Tokenizer:
    """Token id -> one letter (what the server needs of a tokenizer for token-id prompts)."""
    chat_template = None

    def decode(self, ids) -> str:
        return "".join(chr(97 + t % 26) for t in ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 26 for c in text]


class SimEngine:
    """`LLMEngine`'s step-level interface, timed as described in the module docstring; DELTA outputs."""

    def __init__(self, host_ms: float, device_ms: float, vocab_size: int = 1000, max_model_len: int = 1 << 16):
        from pagoda.engine.llm_engine import StepStats

        self.host_s, self.device_s = host_ms / 1e3, device_ms / 1e3
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(max_model_len=max_model_len)
        self.tokenizer = _Tokenizer()
        self.block_manager = SimpleNamespace(usage=0.0, num_queried_tokens=0, num_hit_tokens=0)
        self.scheduler = SimpleNamespace(running=[], waiting=[], block_manager=self.block_manager)
        self.stats = StepStats()
        self._left: dict[str, int] = {}

    def add_request(self, request_id: str, prompt: dict, params) -> None:
        self._left[request_id] = params.max_tokens
        self.scheduler.running.append(request_id)

    def abort_request(self, request_ids) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            if self._left.pop(rid, None) is not None:
                self.scheduler.running.remove(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self._left)

    def step(self) -> list:
        from pagoda.engine.outputs import CompletionOutput, RequestOutput

        t0 = time.perf_counter()
        end = t0 + self.host_s
        while time.perf_counter() < end:         # the engine's own Python: the GIL held
            pass
        outs = []
        for rid in list(self._left):
            left = self._left[rid] - 1
            done = left == 0
            tok = (len(rid) + left) % self.vocab_size
            outs.append(RequestOutput(rid, None, [], None, [CompletionOutput(0, chr(97 + tok % 26), [tok], None, None,
                                                                             "length" if done else None)], done))
            if done:
                del self._left[rid]
                self.scheduler.running.remove(rid)
            else:
                self._left[rid] = left
        host = time.perf_counter() - t0
        wait = self.device_s - host
        if wait > 0:
            time.sleep(wait)                      # the device: the GIL free
        self.stats.add(SimpleNamespace(num_tokens=len(outs), is_decode_only=True), None, host, max(wait, 0.0))
        return outs


def run_one(cfg: SimConfig, clients: int) -> dict:
    """One server over a fresh `SimEngine`, loaded by `pagoda bench serve` at ``clients`` concurrent streams."""
    from pagoda.server.app import build_app
    from pagoda.server.launcher import make_server

    if cfg.engine_process:
        from pagoda.server.engine_process import ProcessEngineLoop
        engine = ProcessEngineLoop(SimEngine, (cfg.host_ms, cfg.device_ms)).launch(timeout=300)
    else:
        engine = SimEngine(cfg.host_ms, cfg.device_ms)
    app = build_app(engine, served_model_name="sim", tokenizer=_Tokenizer())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = make_server(app, "127.0.0.1", sock.getsockname()[1], log_level="warning", shutdown_timeout=10.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the simulated server did not start")
            time.sleep(0.01)
        with tempfile.TemporaryDirectory() as out:
            cpu0 = time.process_time()
            cmd = [sys.executable, "-m", "pagoda", "bench", "serve", "--base-url", url, "--num-prompts",
                   str(cfg.num_prompts), "--input-len", str(cfg.input_len), "--output-len", str(cfg.output_len),
                   "--vocab-size", str(engine.vocab_size), "--max-concurrency", str(clients), "--out", out]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                             os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=cfg.timeout_s)
            cpu = time.process_time() - cpu0      # (idle while the client starts: over its timed run)
            if proc.returncode != 0:
                raise RuntimeError(f"pagoda bench serve failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            res = json.loads((Path(out) / "serve.json").read_text())["results"]
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        close = getattr(engine, "close", None)     # an engine process the server never started stops too
        if close is not None:
            close()
    eng = res.get("engine") or {}
    steps = (eng.get("decode_steps") or 0) + (eng.get("prefill_steps") or 0)
    ceiling = clients / max(cfg.host_ms, cfg.device_ms) * 1e3
    step_ms = (eng.get("decode_host_ms") or 0.0) + (eng.get("decode_wait_ms") or 0.0)
    return dict(clients=clients, completed=res["completed"], failed=res["failed"],
                output_tok_s=_report.significant(res["output_throughput"]),
                ceiling_tok_s=_report.significant(ceiling),
                frac_of_ceiling=_report.significant(res["output_throughput"] / ceiling),
                engine_steps=steps, step_ms=_report.significant(step_ms) if step_ms else None,
                server_cpu_frac=_report.significant(cpu / res["duration_s"]), tpot_median_ms=_report.significant(
                    res["median_tpot_ms"]))


def run_study(cfg: SimConfig) -> dict:
    rows = [run_one(cfg, c) for c in cfg.clients]
    import torch

    meta = _report.environment(torch.device("cpu"))
    meta.update(config=asdict(cfg), cpus=os.cpu_count())
    return {"study": "serve-sim", "meta": meta, "backends": {}, "results": rows}


def tables(report: dict, markdown: bool = False) -> str:
    c = report["meta"]["config"]
    cols = ["clients", "completed", "failed", "output_tok_s", "ceiling_tok_s", "frac_of_ceiling", "engine_steps",
            "step_ms", "server_cpu_frac", "tpot_median_ms"]
    where = "its own process" if c.get("engine_process", False) else "a thread of the server's process"
    head = (f"pagoda serve over a simulated engine in {where} ({c['host_ms']} ms of engine Python, a "
            f"{c['device_ms']} ms step), {c['num_prompts']} streaming requests of {c['output_len']} tokens, "
            f"{report['meta']['cpus']} CPUs")
    fmt = _report.markdown_table if markdown else _report.format_table
    return head + "\n\n" + fmt(cols, [[r.get(k) for k in cols] for r in report["results"]])


def main(argv: list[str] | None = None) -> int:
    d = SimConfig()
    p = argparse.ArgumentParser(prog="python -m pagoda.bench.serve_sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--host-ms", type=float, default=d.host_ms, help=f"engine-thread Python per step ({d.host_ms})")
    p.add_argument("--device-ms", type=float, default=d.device_ms, help=f"a step's period alone ({d.device_ms})")
    p.add_argument("--clients", default=",".join(map(str, d.clients)), help="concurrencies, comma-separated")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--output-len", type=int, default=d.output_len)
    p.add_argument("--engine-thread", action="store_true",
                   help="run the engine in a thread of the server's process (default: its own process)")
    p.add_argument("--out", help="directory for serve-sim.json and serve-sim.md")
    a = p.parse_args(argv)
    cfg = SimConfig(host_ms=a.host_ms, device_ms=a.device_ms,
                    clients=tuple(int(x) for x in a.clients.split(",") if x), num_prompts=a.num_prompts,
                    output_len=a.output_len, engine_process=not a.engine_thread)
    report = run_study(cfg)
    print(tables(report))
    if a.out:
        paths = _report.write_outputs(a.out, "serve-sim", report, tables(report, markdown=True))
        print("\nwrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

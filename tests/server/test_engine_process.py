"""The engine in a process of its own (`ProcessEngineLoop`, `pagoda serve`'s default), over the simulated engine:
concurrent streams get every token, a client that leaves frees its request in the engine process, metrics cross
the process boundary, an engine that fails to build or dies is reported, and shutdown stops the process."""
import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from pagoda.bench.serve import engine_counters
from pagoda.bench.serve_sim import SimEngine, _Tokenizer
from pagoda.server.engine_process import ProcessEngineLoop
from tests.server.helpers import running_server


def _gauge(text: str, name: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"pagoda:{name}{{"))
    return float(line.rsplit(" ", 1)[1])


async def _stream(client: httpx.AsyncClient, max_tokens: int) -> tuple[str, dict]:
    text, usage = "", None
    body = {"model": "sim", "prompt": [1, 2, 3], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                text += c["text"]
    return text, usage


def test_streams_abort_metrics_and_shutdown():
    loop = ProcessEngineLoop(SimEngine, kwargs={"host_ms": 0.0, "device_ms": 2.0}).launch(timeout=120)
    assert loop.config.max_model_len == 1 << 16 and loop.vocab_size == 1000
    pid = loop.pid
    with running_server(loop, served_model_name="sim", tokenizer=_Tokenizer()) as (url, _):
        async def many():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(*[_stream(c, 5 + i % 7) for i in range(40)])

        got = asyncio.run(many())
        for i, (text, usage) in enumerate(got):
            n = 5 + i % 7
            assert len(text) == n and usage["completion_tokens"] == n and usage["prompt_tokens"] == 3
        metrics = httpx.get(url + "/metrics").text
        counts = engine_counters(metrics)
        assert counts[("steps", "decode")] >= 11          # one token a step: at least the longest request's steps
        # The engine loop's clock: steps of 2 ms device time each, and the idle wait before the first request.
        assert counts[("loop_s", "steps")] >= 11 * 0.002
        assert counts[("loop_s", "idle")] > 0 and counts[("loop_s", "handoff")] > 0
        assert counts[("loop_s", "commands")] >= 0 and counts[("server_cpu_s", "")] > 0
        assert _gauge(metrics, "generation_tokens_total") == sum(5 + i % 7 for i in range(40))

        # A client that leaves mid-stream: the engine process drops the request at its next step.
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"model": "sim", "prompt": [1], "max_tokens": 60000, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
        deadline = time.monotonic() + 20
        while _gauge(httpx.get(url + "/metrics").text, "num_requests_running") != 0:
            assert time.monotonic() < deadline, "the aborted request is still running in the engine process"
            time.sleep(0.05)
        assert httpx.get(url + "/health").status_code == 200
    # The server's shutdown stopped the engine process.
    assert not loop._proc.is_alive() and loop._proc.exitcode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_engine_death_fails_requests_and_health():
    loop = ProcessEngineLoop(SimEngine, kwargs={"host_ms": 0.0, "device_ms": 2.0}).launch(timeout=120)
    with running_server(loop, served_model_name="sim", tokenizer=_Tokenizer()) as (url, _):
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"model": "sim", "prompt": [1], "max_tokens": 60000, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            os.kill(loop.pid, signal.SIGKILL)
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]" and "exited" in json.loads(rest[-2][6:])["error"]["message"]
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/completions", json={"model": "sim", "prompt": [1], "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["message"]


def _broken_factory():
    raise ValueError("no such model folder: /nowhere")


def test_a_failed_build_is_an_error_at_launch():
    with pytest.raises(RuntimeError, match="no such model folder"):
        ProcessEngineLoop(_broken_factory).launch(timeout=120)


def test_close_without_a_server_stops_the_engine():
    """A server that never starts (a port in use exits from inside uvicorn) must not leave its engine behind."""
    loop = ProcessEngineLoop(SimEngine, kwargs={"host_ms": 0.0, "device_ms": 2.0}).launch(timeout=120)
    loop.close(timeout=30)
    assert not loop._proc.is_alive() and loop._proc.exitcode == 0
    loop.close()                                   # again: nothing to do


def test_serve_a_missing_folder_is_a_clear_error(tmp_path, caplog):
    from pagoda.cli import build_parser
    from pagoda.server.launcher import serve

    args = build_parser().parse_args(["serve", str(tmp_path / "nowhere"), "--port", "1"])
    assert serve(args) == 1
    assert "does not exist" in caplog.text


_ORPHAN = """
import os, signal, sys
from pagoda.bench.serve_sim import SimEngine
from pagoda.engine.sampling_params import SamplingParams
from pagoda.server.engine_process import ProcessEngineLoop

loop = ProcessEngineLoop(SimEngine, kwargs={"host_ms": 0.0, "device_ms": 1.0}).launch(timeout=120)
print(loop.pid, flush=True)
for i in range(300):      # outputs pile up unread: more than a pipe holds
    loop._send(("add", f"r{i}", {"prompt_token_ids": [1]}, SamplingParams(max_tokens=50000)))
import time; time.sleep(1.0)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_engine_exits_when_its_server_is_killed_while_busy():
    """A server killed outright (SIGKILL) while its engine is busy and its results unread: the engine process
    notices and exits (it must not wait to flush its results into a pipe nobody reads)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _ORPHAN], capture_output=True, text=True, env=env, timeout=180)
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 30
    while True:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            break
        if state == "Z":                # exited; its new parent has not reaped it yet
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the engine process outlived its killed server by 30 s")
        time.sleep(0.2)


def test_outputs_cross_as_plain_tuples_and_come_back_whole():
    """`pack_events` / `pagoda.server.packed.unpack_output`: every field of every sample survives the crossing
    (logprobs, reasons, cached tokens), the prompt stays behind, and acknowledgements pass through unchanged."""
    import pickle

    from pagoda.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from pagoda.server.engine_process import pack_events
    from pagoda.server.packed import unpack_output

    outs = [CompletionOutput(0, " a", [5], -0.25, [{5: Logprob(-0.25, 1, " a")}]),
            CompletionOutput(1, " b.", [6, 7], -1.5, None, "stop", "."),
            CompletionOutput(2, "", [], None, None, "length")]
    out = RequestOutput("r1", "the prompt", [1, 2, 3], None, outs, True, None, 16)
    events = [("ack", "r0", None), ("ack", "r2", "bad request"), ("out", "r1", out)]
    crossed = pickle.loads(pickle.dumps(pack_events(events)))
    back = [(k, r, unpack_output(p) if k == "out" else p) for k, r, p in crossed]
    assert back[:2] == events[:2]
    kind, rid, got = back[2]
    assert (kind, rid) == ("out", "r1")
    assert got.prompt is None and got.prompt_token_ids == []
    assert (got.request_id, got.finished, got.num_cached_tokens, got.metrics) == ("r1", True, 16, None)
    assert got.outputs == outs


def test_folding_packed_outputs_equals_merging_outputs():
    """What a stream folds from packed outputs (the engine process's) equals `RequestOutput.add` over the same
    outputs unpacked: one sample with and without logprobs, several samples, DELTA and CUMULATIVE, and the
    RequestStream reading packed items stops at the finished one."""
    import asyncio
    import copy

    from pagoda.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from pagoda.server.engine_loop import RequestStream
    from pagoda.server.packed import fold, pack_output, unpack_output

    def step(i, n_samples=1, lp=False, finished=False, cached=None):
        outs = [CompletionOutput(k, f"<{i}.{k}>", [10 * i + k, 10 * i + k + 1], -0.5 * i,
                                 [{10 * i + k: Logprob(-0.5, 1, "x")}] * 2 if lp else None,
                                 "length" if finished else None) for k in range(n_samples)]
        return RequestOutput("r", None, [], None, outs, finished, None, cached)

    cases = [[step(0), step(1), step(2, finished=True)],
             [step(0, lp=True), step(1, lp=True), step(2, lp=True, cached=32)],
             [step(0, n_samples=2), step(1, n_samples=2, finished=True)],
             [step(0), step(1, lp=True)]]
    for seq in cases:
        for aggregate in (True, False):
            want = copy.deepcopy(seq[0])
            for o in copy.deepcopy(seq[1:]):
                want.add(o, aggregate)
            got = fold([pack_output(o) for o in seq], aggregate)
            assert got == want, (seq, aggregate)
    assert fold([pack_output(step(3))], True) == unpack_output(pack_output(step(3)))

    async def read():
        s = RequestStream("r")
        for o in [step(0), step(1, finished=True), step(2)]:
            s.put(pack_output(o))
        return [o async for o in s]

    got = asyncio.run(read())
    assert len(got) == 1 and got[0].finished and got[0].outputs[0].token_ids == [0, 1, 10, 11]

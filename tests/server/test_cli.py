"""`pagoda serve` as a process: `pagoda bench serve` against it, then SIGTERM with a stream running (it ends with
an error event and [DONE], the process exits, nothing hangs)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pagoda.bench.serve import ServeBenchConfig, sample_requests
from pagoda.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tiny_model, tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pagoda", "serve", str(tiny_model("qwen3")), "--port", str(port),
                             "--served-model-name", "tiny", "--max-num-seqs", "32", "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_sample_requests_lengths():
    cfg = ServeBenchConfig(num_prompts=500, input_len=100, output_len=10, range_ratio=0.5, vocab_size=50, seed=3)
    reqs = sample_requests(cfg)
    ins, outs = [len(ids) for ids, _ in reqs], [n for _, n in reqs]
    assert min(ins) >= 50 and max(ins) <= 150 and min(outs) >= 5 and max(outs) <= 15
    assert 90 < sum(ins) / len(ins) < 110 and len(set(ins)) > 50       # uniform over the range, not fixed
    assert all(0 <= t < 50 for ids, _ in reqs for t in ids)
    assert sample_requests(cfg) == reqs
    with pytest.raises(ValueError, match="range_ratio"):
        ServeBenchConfig(range_ratio=1.0)


def test_bench_serve_then_sigterm_with_a_stream_running(served, tmp_path, capsys):
    url, proc = served
    assert main(["bench", "serve", "--base-url", url, "--num-prompts", "24", "--input-len", "8", "--output-len", "4",
                 "--range-ratio", "0.5", "--vocab-size", "300", "--max-concurrency", "8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serve.json").read_text())
    res = report["results"]
    assert res["completed"] == 24 and res["failed"] == 0
    want = sum(n for _, n in sample_requests(ServeBenchConfig(num_prompts=24, input_len=8, output_len=4,
                                                              range_ratio=0.5, vocab_size=300)))
    assert res["total_output_tokens"] == want
    assert 0 < res["median_ttft_ms"] <= res["p99_ttft_ms"] and res["output_throughput"] > 0
    eng = res["engine"]            # the server's steps during the run, from its /metrics
    assert eng["prefill_steps"] >= 1 and eng["decode_steps"] >= 3 and eng["decode_host_ms"] > 0
    assert eng["prefill_steps"] + eng["decode_steps"] < 24 * 5     # batched: fewer steps than tokens
    assert "Output token throughput" in (tmp_path / "serve.md").read_text()
    assert "Engine decode / prefill steps" in (tmp_path / "serve.md").read_text()
    assert "Time to first token" in capsys.readouterr().out

    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"prompt": "hello", "max_tokens": 240, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(rest[-2][6:])["error"]["message"]
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM     # a normal exit, reporting the signal
    assert time.monotonic() - t0 < 30
    log = (tmp_path / "server.log").read_text()
    assert "leaked semaphore" not in log and "Traceback" not in log, log      # exit handlers ran


def test_bench_serve_offline_same_requests(tiny_model, tmp_path):
    args = ["--num-prompts", "12", "--input-len", "8", "--output-len", "4", "--range-ratio", "0.5",
            "--vocab-size", "300", "--max-concurrency", "4"]
    assert main(["bench", "serve", *args, "--offline", str(tiny_model("qwen3")), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serve-offline.json").read_text())
    want = sum(n for _, n in sample_requests(ServeBenchConfig(num_prompts=12, input_len=8, output_len=4,
                                                              range_ratio=0.5, vocab_size=300)))
    assert report["results"]["completed"] == 12 and report["results"]["total_output_tokens"] == want
    assert report["meta"]["engine"]["max_num_seqs"] == 4
    eng = report["results"]["engine"]
    assert eng["prefill_steps"] >= 3 and eng["decode_steps"] >= 3 and eng["graph_steps"] == 0   # CPU: no graphs
    assert "Output token throughput" in (tmp_path / "serve-offline.md").read_text()

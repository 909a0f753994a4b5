"""`pagoda.bench.serve_sim`: the simulated engine keeps LLMEngine's step-level contract (one token per running
request a step, DELTA outputs, the step's host and wait time in its stats), and a small study runs the real
server and load generator end to end."""
import time
from types import SimpleNamespace

import pytest

from pagoda.bench import serve_sim


def test_sim_engine_steps_and_timing():
    e = serve_sim.SimEngine(host_ms=1.0, device_ms=4.0)
    e.add_request("a", {"prompt_token_ids": [1]}, SimpleNamespace(max_tokens=2))
    e.add_request("b", {"prompt_token_ids": [1]}, SimpleNamespace(max_tokens=3))
    t0 = time.perf_counter()
    first = e.step()
    assert time.perf_counter() - t0 >= 0.004
    assert [(o.request_id, len(o.outputs[0].token_ids), o.finished) for o in first] == [("a", 1, False),
                                                                                       ("b", 1, False)]
    assert [o.finished for o in e.step()] == [True, False]
    e.abort_request(["b"])
    assert not e.has_unfinished_requests() and e.scheduler.running == []
    assert e.stats.steps == e.stats.decode_steps == 2 and e.stats.host_s >= 0.002 and e.stats.wait_s > 0.004


def test_config_checks():
    with pytest.raises(ValueError, match="device_ms"):
        serve_sim.SimConfig(device_ms=0)
    with pytest.raises(ValueError, match="clients"):
        serve_sim.SimConfig(clients=(0,))


def test_small_study_end_to_end(tmp_path):
    cfg = serve_sim.SimConfig(host_ms=0.5, device_ms=2.0, clients=(4,), num_prompts=12, output_len=6,
                              timeout_s=120)
    report = serve_sim.run_study(cfg)
    (row,) = report["results"]
    assert row["completed"] == 12 and row["failed"] == 0
    assert row["ceiling_tok_s"] == pytest.approx(4 / 2.0 * 1e3)
    assert 0 < row["frac_of_ceiling"] <= 1.05 and row["engine_steps"] >= 12 * 6 / 4
    assert "simulated engine" in serve_sim.tables(report, markdown=True)

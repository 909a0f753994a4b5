"""The sampling study on the CPU: the embedded grid runs and its report has the promised schema."""
import json

import pytest
import torch

from pagoda.bench import sampling
from pagoda.bench.report import write_outputs
from pagoda.cli import main


def test_full_grid_is_the_vocab_by_batch_grid():
    grid = sampling.sampling_grid("full")
    assert {(c.vocab, c.batch) for c in grid} == {(v, b) for v in (32000, 128256, 151936) for b in (1, 32, 128, 512)}
    with pytest.raises(ValueError, match="grid"):
        sampling.sampling_grid("huge")
    with pytest.raises(ValueError, match="unknown backend"):
        sampling.run_study("small", ["nope"], torch.device("cpu"))


@pytest.mark.parametrize("op", sampling.OPS)
def test_torch_sort_baseline_respects_its_filter(op):
    probs = torch.softmax(torch.randn(64, 300) * 3, -1)
    out = sampling.torch_sort_sample(probs, op)
    assert out.shape == (64,) and ((out >= 0) & (out < 300)).all()
    if op in ("top_k", "top_k_top_p"):
        kth = probs.topk(sampling.TOP_K, -1).values[:, -1]
        assert (probs.gather(1, out[:, None]).squeeze(1) >= kth).all()


def test_cpu_study_schema(tmp_path):
    report = sampling.run_study("small", None, torch.device("cpu"), torch.float32)
    assert report["study"] == "sampling"
    for key in ("date", "torch", "triton", "device", "command", "grid", "dtype", "params"):
        assert key in report["meta"], key
    assert set(report["backends"]) == {"pagoda", "torch_sort", "flashinfer"}
    assert not report["backends"]["flashinfer"]["available"] and report["backends"]["flashinfer"]["reason"]
    rows = report["results"]
    grid = sampling.sampling_grid("small")
    assert len(rows) == len(grid) * len(sampling.OPS) * 3
    for r in rows:
        assert {"batch", "vocab", "op", "backend", "status", "us", "gbps", "floor_us", "floor_gbps"} <= set(r)
        assert r["floor_us"] > 0 and r["floor_gbps"] > 0
        if r["backend"] == "flashinfer":
            assert r["status"] == "unavailable" and r["reason"]
        else:
            assert r["status"] == "ok", r
            assert r["us"] > 0 and r["gbps"] > 0
    json.dumps(report)  # serialisable as is
    text = sampling.tables(report)
    assert "top_p sampling" in text and "vs torch_sort" in text
    assert "flashinfer: flashinfer.sampling not importable" in text and "needs a CUDA device" in text
    paths = write_outputs(tmp_path, "sampling", report, sampling.tables(report, markdown=True))
    assert json.loads(paths[0].read_text())["study"] == "sampling"
    assert "| vocab | batch |" in paths[2].read_text()


def test_budget_skips_the_cases_it_cannot_start_and_says_so():
    report = sampling.run_study("small", ["torch_sort"], torch.device("cpu"), torch.float32, budget_s=0)
    grid = sampling.sampling_grid("small")   # past the budget once the first case has run
    assert {(r["vocab"], r["batch"]) for r in report["results"]} == {(grid[0].vocab, grid[0].batch)}
    assert report["meta"]["skipped_cases"] == [c.label() for c in grid[1:]]
    assert "Cases not run (started past --budget-s 0)" in sampling.tables(report)
    with pytest.raises(ValueError, match="budget_s"):
        sampling.run_study("small", ["torch_sort"], torch.device("cpu"), torch.float32, budget_s=-1)


def test_budget_is_a_command_line_option(tmp_path, capsys):
    assert main(["bench", "sampling", "--device", "cpu", "--backends", "torch_sort", "--budget-s", "0",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "sampling.json").read_text())
    assert len(report["meta"]["skipped_cases"]) == len(sampling.sampling_grid("small")) - 1
    assert "started past --budget-s 0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "sampling", "--device", "cpu", "--budget-s", "-3"])


def test_ratios_compare_the_same_timing_method():
    pagoda = {"status": "ok", "us": 10.0, "eager_us": 30.0, "graph_us": 10.0}
    peer = {"status": "ok", "us": 36.0, "eager_us": 36.0, "graph_us": None}
    assert sampling._ratio(peer, pagoda) == "1.20x"          # the peer was not captured: eager on both sides
    peer.update(graph_us=20.0, us=20.0)
    assert sampling._ratio(peer, pagoda) == "2.00x"          # both captured: device time
    assert sampling._ratio(peer, pagoda, "eager_us") == "1.20x"
    assert sampling._ratio({"status": "error"}, pagoda) == "-"


def test_graph_time_is_the_mean_over_seeds_read_from_the_device_tensor(monkeypatch):
    """Each seed gets its own captured graph (the seed tensor holds it while that graph is timed); the figure
    is their mean, and the tensor is left at zero for the next backend."""
    seed_t = torch.zeros(1, dtype=torch.int64)
    seen = []

    def fake_graph_time_ms(fn, device, **kw):
        seen.append(int(seed_t))
        return 1.0 + int(seed_t)                   # a draw whose cost grows with its seed

    monkeypatch.setattr(sampling, "graph_time_ms", fake_graph_time_ms)
    ms = sampling._seeded_graph_ms(lambda: None, seed_t, torch.device("cpu"))
    assert seen == list(range(sampling.GRAPH_SEEDS))
    assert ms == pytest.approx(1.0 + (sampling.GRAPH_SEEDS - 1) / 2)
    assert int(seed_t) == 0


@pytest.mark.gpu
def test_gpu_case_times_pagoda_and_torch_inside_a_cuda_graph():
    """Every pagoda sampler is captured with device seed/offset tensors; its replay gives the headline."""
    device = torch.device("cuda")
    rows = sampling.run_case(sampling.SamplingCase(4, 32000), ["pagoda", "torch_sort"], device, torch.float32, {})
    for r in rows:
        assert r["status"] == "ok", r
        assert r["eager_us"] > 0 and r["floor_graph_us"] > 0
        if r["backend"] == "pagoda":
            assert r["graph_error"] is None and r["timing"] == "graph" and r["us"] == r["graph_us"] > 0, r
    text = sampling.tables({"meta": {"dtype": "float32"}, "backends": {n: {"available": True, "reason": None}
                            for n in ("pagoda", "torch_sort")}, "results": rows})
    assert "CUDA-graph replay" in text

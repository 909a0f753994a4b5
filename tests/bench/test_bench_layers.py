"""The layers study on the CPU: the embedded grid runs, its report has the promised schema, and the PyTorch
peers compute what pagoda's ops compute."""
import json

import pytest
import torch

from pagoda.bench import layers, timing
from pagoda.bench.report import write_outputs
from pagoda.bench.studies import STUDIES


@pytest.fixture(autouse=True)
def _short_cpu_timing(monkeypatch):
    monkeypatch.setattr(timing, "CPU_MIN_RUNS", 3)


def test_full_grid_is_the_engines_shapes():
    grid = layers.layer_grid("full")
    norms = {(c.op, c.width, c.tokens) for c in grid if c.op in layers.NORM_OPS}
    acts = {(c.op, c.width, c.tokens) for c in grid if c.op in layers.ACT_OPS}
    tokens = (1, 256, 8192, 16384)    # decode at 1 and 256 requests, the 8,192-token prefill chunk, long
    assert norms == {(o, h, n) for o in layers.NORM_OPS for h in (1024, 4096, 8192) for n in tokens}
    assert acts == {(o, d, n) for o in layers.ACT_OPS for d in (3072, 14336) for n in tokens}
    with pytest.raises(ValueError, match="grid"):
        layers.layer_grid("huge")
    with pytest.raises(ValueError, match="op"):
        layers.LayerCase("layernorm", 1, 64)
    with pytest.raises(ValueError, match="unknown backend"):
        layers.run_study("small", ["nope"], torch.device("cpu"))
    assert "layers" in STUDIES


def test_moved_bytes():
    assert layers.moved_bytes(layers.LayerCase("rmsnorm", 10, 64), 2) == (2 * 10 * 64 + 64) * 2
    assert layers.moved_bytes(layers.LayerCase("gemma_fused_add_rmsnorm", 10, 64), 2) == (4 * 10 * 64 + 64) * 2
    assert layers.moved_bytes(layers.LayerCase("silu_and_mul", 10, 48), 4) == 3 * 10 * 48 * 4


@pytest.mark.parametrize("op", layers.OPS)
def test_torch_peer_computes_what_pagoda_computes(op):
    """The PyTorch functions timed beside pagoda are the same maths (HF's forms): equal on the reference path."""
    import pagoda

    t = layers._inputs(layers.LayerCase(op, 5, 96), torch.device("cpu"), torch.bfloat16)
    fn = layers.torch_function(op)
    if op in layers.ACT_OPS:
        assert torch.equal(fn(t["x"]), getattr(pagoda, op)(t["x"]))
    elif "fused" in op:
        x, r = t["x"].clone(), t["r"].clone()
        out, s = fn(**t)
        getattr(pagoda, op)(x, r, t["w"], layers.EPS)
        assert torch.equal(s, r) and torch.equal(out, x)
    else:
        assert torch.equal(fn(**t), getattr(pagoda, op)(t["x"], t["w"], layers.EPS))


def test_cpu_study_schema(tmp_path):
    report = layers.run_study("small", ["pagoda", "torch", "flashinfer"], torch.device("cpu"), torch.float32)
    assert report["study"] == "layers"
    for key in ("date", "torch", "triton", "device", "command", "grid", "dtype", "copy_gbps", "bytes", "timing"):
        assert key in report["meta"], key
    assert report["meta"]["copy_gbps"] > 0
    assert not report["backends"]["flashinfer"]["available"] and report["backends"]["flashinfer"]["reason"]
    rows = report["results"]
    assert len(rows) == len(layers.layer_grid("small")) * 3
    for r in rows:
        assert {"op", "tokens", "width", "backend", "status", "us", "gbps", "copy_frac", "x_copy", "copy_us",
                "bytes"} <= set(r)
        assert r["copy_us"] > 0
        if r["backend"] == "flashinfer":
            assert r["status"] == "unavailable"
        else:
            assert r["status"] == "ok", r
            assert r["us"] > 0 and r["gbps"] > 0 and r["copy_frac"] > 0 and r["x_copy"] > 0
            assert r["timing"] == "clock"          # CUDA: "graph" (or "events" where capture fails)
            assert r["gbps"] == pytest.approx(r["bytes"] / (r["us"] * 1e-6) / 1e9, rel=1e-3)
    json.dumps(report)
    text = layers.tables(report)
    assert "rmsnorm, us per call" in text and "vs torch" in text and "of copy BW" in text
    assert "flashinfer: needs a CUDA device" in text
    paths = write_outputs(tmp_path, "layers", report, layers.tables(report, markdown=True))
    assert json.loads(paths[0].read_text())["study"] == "layers"
    assert "| width | tokens |" in paths[2].read_text()


def test_compile_backend_compiles_once_per_op_and_width(monkeypatch):
    """torch.compile (replaced here: a real compile takes ~40 s on this CPU) wraps the PyTorch function once per
    (op, width); other token counts reuse it."""
    compiled = []

    def fake_compile(fn, **kw):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(layers, "_compiled", {})
    report = layers.run_study("small", ["torch_compile"], torch.device("cpu"), torch.float32)
    assert all(r["status"] == "ok" for r in report["results"])
    assert len(compiled) == len(layers.OPS)          # the small grid has one width per op, two token counts


def test_budget_skips_the_cases_it_cannot_start_and_says_so():
    with pytest.raises(ValueError, match="budget_s"):
        layers.run_study("small", ["torch"], torch.device("cpu"), torch.float32, budget_s=-1)
    report = layers.run_study("small", ["torch"], torch.device("cpu"), torch.float32, budget_s=0)
    grid = layers.layer_grid("small")
    assert [(r["op"], r["tokens"]) for r in report["results"]] == [(grid[0].op, grid[0].tokens)]
    assert report["meta"]["skipped_cases"] == [c.label() for c in grid[1:]]
    assert "Cases not run (started past --budget-s 0)" in layers.tables(report)


@pytest.mark.gpu
def test_gpu_cases_reach_the_streaming_rate():
    """On the GPU every pagoda op runs and a large case moves at least half the copy bandwidth."""
    device = torch.device("cuda")
    peak = layers.copy_gbps(device)
    assert peak > 500
    for case in (layers.LayerCase("fused_add_rmsnorm", 4096, 4096), layers.LayerCase("silu_and_mul", 4096, 14336)):
        rows = layers.run_case(case, ["pagoda", "torch"], device, torch.bfloat16, {}, peak)
        by = {r["backend"]: r for r in rows}
        assert all(r["status"] == "ok" for r in rows), rows
        assert by["pagoda"]["copy_frac"] > 0.5, by["pagoda"]
        assert by["pagoda"]["us"] < by["torch"]["us"], rows


def test_time_us_falls_back_from_graph_capture(monkeypatch):
    """On CUDA a call is timed replayed from a CUDA graph; one that cannot be captured is timed as called."""
    calls = []
    monkeypatch.setattr(layers, "graph_time_ms", lambda fn, device, **kw: (_ for _ in ()).throw(RuntimeError("sync")))
    monkeypatch.setattr(layers, "time_ms", lambda fn, device, **kw: calls.append(kw) or 0.002)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert layers.time_us(lambda: None, torch.device("cuda")) == (2.0, "events") and calls
    monkeypatch.setattr(layers, "graph_time_ms", lambda fn, device, **kw: 0.003)
    assert layers.time_us(lambda: None, torch.device("cuda")) == (3.0, "graph")

"""`pagoda bench` on the CPU: the embedded default grid runs and its outputs have the promised schema."""
import csv
import json

import pytest
import torch

from pagoda.bench.attention import attention_grid, tables
from pagoda.bench.backends import ATTENTION_BACKENDS, attention_flops
from pagoda.cli import main


def test_flops_formula():
    assert attention_flops(2, 1024, 1024, 16, 128, False) == 4 * 2 * 1024 * 1024 * 16 * 128
    assert attention_flops(2, 1024, 1024, 16, 128, True) == 2 * 2 * 1024 * 1024 * 16 * 128


def test_full_grid_is_the_flash_attention_grid():
    grid = attention_grid("full")
    assert len(grid) == 24
    assert {(c.batch, c.seqlen) for c in grid} == {(32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192),
                                                   (1, 16384)}
    assert all(c.nheads * c.head_dim == 2048 for c in grid)
    with pytest.raises(ValueError, match="grid"):
        attention_grid("huge")


def test_default_bench_writes_json_csv_markdown(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "head_dim=128 causal" in printed
    report = json.loads((tmp_path / "attention.json").read_text())
    assert report["study"] == "attention"
    for key in ("date", "torch", "triton", "device", "command"):
        assert key in report["meta"]
    # Every registered backend appears, either with figures or with the reason it cannot run.
    assert set(report["backends"]) == set(ATTENTION_BACKENDS)
    for name, info in report["backends"].items():
        assert info["available"] or info["reason"], name
    rows = report["results"]
    assert len(rows) == len(attention_grid("small")) * len(ATTENTION_BACKENDS)
    for r in rows:
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["tflops"] > 0
        else:
            assert r["reason"], r
    ok_pagoda = [r for r in rows if r["backend"] == "pagoda" and r["status"] == "ok"]
    assert len(ok_pagoda) == len(attention_grid("small"))
    with (tmp_path / "attention.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    # The newcomer's first minute: every backend that could not run is named with its reason, every figure
    # has its spread, and the CPU run uses one intra-op thread (stable figures on a busy host).
    unavailable = printed.split("Unavailable backends:")[1]
    for name in ("flex", "flash_attn", "flashinfer", "xformers", "sdpa_cudnn", "sdpa_flash"):
        assert f"  {name}: " in unavailable, name
    assert "flash_attn not importable" in unavailable and "needs a CUDA device" in unavailable
    assert "Spread (interquartile range / median)" in printed
    assert all(r["spread"] is not None and r["spread"] >= 0 for r in ok_pagoda)
    assert report["meta"]["threads"] == 1
    md = (tmp_path / "attention.md").read_text()
    assert md.startswith("# pagoda bench: attention") and "| batch | seqlen |" in md
    assert tables(report)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        main(["bench", "--device", "cpu", "--backends", "nope"])


def test_cpu_timing_takes_enough_runs_and_reports_the_spread():
    from pagoda.bench import timing

    calls = []
    ms, spread = timing.time_stats(lambda: calls.append(1), torch.device("cpu"), rep_ms=0)
    assert len(calls) == timing.CPU_WARMUP + timing.CPU_MIN_RUNS and ms >= 0 and spread >= 0
    assert timing.spread([1.0, 1.0, 1.0, 1.0, 1.0]) == 0
    assert timing.spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(1.0)   # quartiles 1.5 and 4.5, median 3

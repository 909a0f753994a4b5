"""The e2e study's sampling cases on the CPU: generate with HF's warpers vs pagoda's, the sampling-step timing,
the sampling grid's time budget, the tables."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from pagoda.bench import e2e, e2e_sampling  # noqa: E402
from pagoda.integrations import hf_sampling  # noqa: E402


@pytest.fixture
def op_calls(monkeypatch):
    """Calls of pagoda's warper function (what only pagoda's warpers run); pagoda sampling left off after the
    test."""
    calls = []
    real = hf_sampling.warp_logits
    monkeypatch.setattr(hf_sampling, "warp_logits", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    yield calls
    hf_sampling.disable()


def test_sampling_processors_configure_generate(op_calls):
    """sample_pagoda samples through pagoda's warpers (HF's tokens for the same seed), sample_hf through HF's,
    "none" decodes greedily; the switch is off again after each generate."""
    model = e2e.build_model("tiny", torch.device("cpu"), torch.float32)
    tokens = {}
    for proc in ("sample_hf", "sample_pagoda", "none"):
        torch.manual_seed(0)
        fn = e2e._generate_fn(model, "sdpa", 2, 5, 4, "dynamic", proc, torch.device("cpu"))
        before = len(op_calls)
        torch.manual_seed(1)
        tokens[proc] = fn()
        assert len(op_calls) - before == (4 if proc == "sample_pagoda" else 0), proc
        assert not hf_sampling.is_enabled()
    assert torch.equal(tokens["sample_hf"], tokens["sample_pagoda"])
    assert e2e_sampling.generate_kwargs("none") == {} and e2e_sampling.generate_kwargs("sample_hf")["do_sample"]
    with pytest.raises(ValueError, match="sample_greedy"):
        e2e.E2EConfig(processors=("sample_greedy",))


def test_study_with_sampling_cases_reports_the_step_and_the_ratio(tmp_path):
    cfg = e2e.E2EConfig(batch_sizes=(2,), new_tokens=2, caches=("dynamic",),
                        processors=("none", *e2e_sampling.SAMPLERS), repeats=1, host_overhead=False)
    rep = e2e.run_study(cfg, ["sdpa"], torch.device("cpu"), torch.float32, out=str(tmp_path))
    assert [(r["processor"], r["status"]) for r in rep["results"]] == [
        ("none", "ok"), ("sample_hf", "ok"), ("sample_pagoda", "ok")]
    step = rep["sampling_step"]
    assert [(r["batch"], r["logits"]) for r in step] == [(2, "model"), (2, "randn*3")]
    for r in step:
        assert r["sample_hf_ms"] > 0 and r["sample_pagoda_ms"] > 0 and r["vocab"] == 256
        assert r["kept_tokens_differ"] == 0 and r["kept_differ_mass"] == 0.0
        assert 1 <= r["kept_tokens_hf"] <= e2e_sampling.TOP_K
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["sampling_step"] == step
    md = (tmp_path / "e2e.md").read_text()
    assert "One sampling step" in md and "pagoda / HF warpers" in md


def test_sampling_tables_read_the_rows():
    row = dict(model="m", impl="sdpa", cache="dynamic", batch=4, status="ok")
    report = {"meta": {"model": "m"}, "results": [
        {**row, "processor": "none", "tokens_per_s": 100.0},
        {**row, "processor": "sample_hf", "tokens_per_s": 80.0},
        {**row, "processor": "sample_pagoda", "tokens_per_s": 96.0},
        {**row, "batch": 8, "processor": "sample_hf", "status": "timeout", "tokens_per_s": None},
        {**row, "batch": 8, "processor": "sample_pagoda", "tokens_per_s": 50.0}],
        "sampling_step": [dict(batch=4, vocab=10, logits="model", sample_hf_ms=2.0, sample_pagoda_ms=0.5, speedup=4.0,
                               kept_tokens_hf=3.0, kept_tokens_differ=2, kept_differ_mass=3e-7)]}
    text = "\n".join(e2e_sampling.tables(report))
    assert "1.20x" in text and "4.00x" in text and "timeout" in text and "2 (3e-07)" in text
    assert e2e_sampling.tables({"meta": {"model": "m"}, "results": [{**row, "processor": "none"}]}) == []
    assert e2e_sampling.tables({"results": [], "sampling_step": {"error": "boom"}}) == ["Sampling step: boom"]


def test_sampling_grid_fits_five_minutes():
    """The sampling preset (the issue's figures): batches 128/16/1, HF's warpers vs pagoda's beside greedy, sdpa and
    pagoda attention. At a conservative 35 ms per host-bound decode step (+0.1 s prefill), its generates, the model
    build (~10 s), the agreement check and the sampling step (60 s at most) fit its budget, and the budget ~5 min."""
    cfg = e2e.default_config(torch.device("cuda"), "sampling")
    assert set(cfg.batch_sizes) == {1, 16, 128} and set(e2e_sampling.SAMPLERS) <= set(cfg.processors)
    generate_s = 0.1 + cfg.new_tokens * 0.035
    groups = 2 * len(cfg.caches) * len(cfg.batch_sizes)
    grid_s = groups * (1 + cfg.repeats * len(cfg.processors)) * generate_s
    assert grid_s + 10 + 30 + 60 <= cfg.budget_s <= 300, grid_s
    assert not cfg.max_batch_search and not cfg.host_overhead

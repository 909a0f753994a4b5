"""The e2e study, `bench compare` and plots on the CPU: schemas, reasons for every unavailable row."""
import json

import pytest
import torch

from pagoda.bench import e2e
from pagoda.bench.compare import compare
from pagoda.cli import main

pytest.importorskip("transformers")


def test_e2e_cli_writes_report_with_every_implementation(tmp_path, capsys):
    assert main(["bench", "e2e", "--device", "cpu", "--batch-sizes", "1,2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert report["study"] == "e2e" and report["meta"]["model"] == "tiny"
    assert set(report["backends"]) == set(e2e.IMPLEMENTATIONS)
    for name, info in report["backends"].items():
        assert info["available"] or info["reason"], name
    assert not report["backends"]["pagoda_engine"]["available"]
    ok = [r for r in report["results"] if r["status"] == "ok"]
    impls = {r["impl"] for r in ok}
    assert {"eager", "sdpa", "pagoda"} <= impls
    # 2 caches x 2 processors x 2 batch sizes per runnable implementation, all with a positive rate
    assert len([r for r in ok if r["impl"] == "pagoda"]) == 8
    assert all(r["tokens_per_s"] > 0 and r["ms"] > 0 for r in ok)
    assert (tmp_path / "e2e.md").read_text().startswith("# pagoda bench: e2e")
    assert "tokens/s" in capsys.readouterr().out


def test_e2e_config_validation():
    with pytest.raises(ValueError, match="batch_sizes"):
        e2e.E2EConfig(batch_sizes=(0,))
    with pytest.raises(ValueError, match="unknown cache"):
        e2e.E2EConfig(caches=("paged",))
    with pytest.raises(ValueError, match="unknown attn implementation"):
        e2e.run_study(e2e.E2EConfig(), ["nope"], torch.device("cpu"), torch.float32)


def _report(tmp_path, name, tflops):
    rows = [dict(batch=1, seqlen=s, backend="pagoda", status="ok", reason=None, ms=1.0, tflops=t)
            for s, t in zip((128, 256), tflops)]
    path = tmp_path / name
    path.write_text(json.dumps({"study": "attention", "meta": {"device_name": name}, "results": rows}))
    return path


def test_compare_reports_ratios(tmp_path, capsys):
    a = _report(tmp_path, "a.json", (1.0, 2.0))
    b = _report(tmp_path, "b.json", (2.0, 3.0))
    text = compare(a, b)
    assert "2.00x" in text and "1.50x" in text and "metric: tflops" in text
    assert main(["bench", "compare", str(a), str(b)]) == 0
    assert "1.50x" in capsys.readouterr().out
    other = tmp_path / "c.json"
    other.write_text(json.dumps({"study": "e2e", "meta": {}, "results": []}))
    with pytest.raises(ValueError, match="different studies"):
        compare(a, other)


def test_attention_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from pagoda.bench.plots import plot
    rows = [dict(head_dim=64, causal=c, seqlen=s, backend=b, status="ok", tflops=float(s) / 100)
            for c in (False, True) for s in (128, 256, 512) for b in ("pagoda", "sdpa")]
    paths = plot({"study": "attention", "meta": {"device_name": "cpu"}, "results": rows}, tmp_path)
    assert paths and paths[0].stat().st_size > 1000


def test_cascade_study_cpu(tmp_path):
    from pagoda.bench import cascade
    assert main(["bench", "cascade", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cascade.json").read_text())
    assert report["study"] == "cascade" and set(report["backends"]) == set(cascade.BACKENDS)
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"pagoda_cascade", "pagoda_decode"}
    assert all(r["ms"] > 0 for r in ok)
    assert all(r["reason"] for r in report["results"] if r["status"] != "ok")
    # The floor of the case: 4*128*32*32768*128 FLOP at 788 TFLOP/s + 128*256 tokens of KV.
    big = cascade.CascadeCase(32768, 256, 128)
    assert abs(cascade.floor_ms(big) - (4 * 128 * 32 * 32768 * 128 / 505e12 + 2 * 128 * 256 * 8 * 128 * 2 / 4.25e12)
               * 1e3) < 1e-12
    with pytest.raises(ValueError, match="multiple of page_size"):
        cascade.CascadeCase(100, 16, 1)


@pytest.mark.parametrize("study", ["decode", "paged"])
def test_decode_and_paged_studies_cpu(tmp_path, study):
    from pagoda.bench import decode
    assert main(["bench", study, "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / f"{study}.json").read_text())
    known = decode.DECODE_BACKENDS if study == "decode" else decode.PAGED_BACKENDS
    assert report["study"] == study and set(report["backends"]) == set(known)
    metric = "tb_per_s" if study == "decode" else "tflops"
    ok = [r for r in report["results"] if r["status"] == "ok"]
    expected = {"pagoda", "pagoda_p1", "sdpa"} if study == "decode" else {"pagoda_paged", "pagoda_dense"}
    assert {r["backend"] for r in ok} == expected
    assert all(r[metric] > 0 for r in ok)
    assert all(r["reason"] for r in report["results"] if r["status"] != "ok")

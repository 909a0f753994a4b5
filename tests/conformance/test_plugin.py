"""The conformance pytest plugin on a small suite: sampling at generation, records, forward-only passes."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "conformance"

SUITE = '''
import pytest
import torch


def fwd(x, bias=0.0):  # a forward-only op: its output has no autograd graph
    return (x * 2 + bias).detach()


def _check(bias):
    x = torch.randn(4, requires_grad=True)
    out, ref = fwd(x, bias), x * 2
    g = torch.ones(4)
    (dq,) = torch.autograd.grad(out, (x,), g)
    (dq_ref,) = torch.autograd.grad(ref, (x,), g)
    assert (out - ref).abs().max().item() <= 1e-6
    assert (dq - dq_ref).abs().max().item() <= 1e-6


def test_forward_right_backward_missing():
    _check(0.0)


def test_forward_wrong():
    _check(1.0)


def test_hidden_error():
    pytest.skip("op kernel unavailable: TypeError: unexpected keyword")


@pytest.mark.parametrize("d", [64, 59])
@pytest.mark.parametrize("dropout_p", [0.0, 0.17])
def test_sampled(d, dropout_p):
    pass
'''


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HARNESS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path),
           "-p", "conformance_plugin", "-p", "no:cacheprovider", "-q", "--conformance-per-function", "1",
           "--conformance-excluded-per-reason", "1", *args, "test_suite.py"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_plugin_samples_records_and_counts_forward_only(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE))
    collect = tmp_path / "collect.json"
    proc = _run(tmp_path, "--collect-only", "--conformance-collect-out", str(collect))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(collect.read_text())
    pop = data["population"]["test_suite.py::test_sampled"]
    # (64, 0.0) in claim; (64, 0.17) and (59, 0.17) dropout first; (59, 0.0) head_dim % 8
    assert pop == {"collected": 4, "in_claim": 1, "excluded_by": {"dropout": 2, "head_dim % 8": 1}}
    sampled = {c["nodeid"]: c["role"] for c in data["cases"] if c["function"] == "test_sampled"}
    # pytest's own ids (bottom decorator first): one in-claim case, one excluded case per reason
    assert sorted(sampled.values()) == ["claim", "excluded", "excluded"]
    assert sampled["test_suite.py::test_sampled[0.0-64]"] == "claim"
    assert "test_suite.py::test_sampled[0.0-59]" in sampled

    record = tmp_path / "record.jsonl"
    _run(tmp_path, "--conformance-record", str(record))
    recs = {}
    for line in record.read_text().splitlines():
        rec = json.loads(line)
        recs[rec["nodeid"].split("::")[1]] = rec
    ok = recs["test_forward_right_backward_missing"]
    assert ok["raw"] == "passed_fwd" and "dq" in ok["backward_assert"]
    assert "does not require grad" in ok["backward_unavailable"]
    bad = recs["test_forward_wrong"]
    assert bad["raw"] == "failed" and bad["error"].startswith("AssertionError")
    assert bad["where"].endswith("test_suite.py:16")  # the forward assertion's line
    assert recs["test_hidden_error"]["raw"] == "skipped"
    assert "unavailable" in recs["test_hidden_error"]["skip_reason"]
    assert recs["test_sampled[0.0-64]"]["raw"] == "passed"


def test_deadline_leaves_cases_unrun(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE))
    record = tmp_path / "record.jsonl"
    _run(tmp_path, "--conformance-record", str(record), "--conformance-deadline", "1")
    assert not record.exists() or record.read_text() == ""

"""run.py --resume: an earlier run's collection and records are reused; only cases without a record run."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "conformance"

SUITE = '''
import pytest


@pytest.mark.parametrize("n", [8, 16, 24])
def test_even(n):
    assert n % 2 == 0


def test_broken():
    assert 1 == 2
'''


def _suites(tmp_path: Path) -> Path:
    root = tmp_path / "suites"
    suite = root / "peer"
    (suite / "tests").mkdir(parents=True)
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "tests" / "test_peer.py").write_text(textwrap.dedent(SUITE))
    (root / "MANIFEST.json").write_text(json.dumps(
        {"peer": {"repo": "x/peer", "tag": "v0", "commit": "0" * 40, "tests": ["tests/test_peer.py"],
                  "import_mode": "prepend", "files": [], "replaced": {}}}))
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HARNESS / "run.py"), "--workers", "1", "--budget-s", "120", *args],
                          capture_output=True, text=True, timeout=300)


def _ran(out: Path) -> set[str]:
    return {json.loads(line)["nodeid"].split("::")[-1]
            for p in (out / "raw").glob("peer-*.jsonl") for line in p.read_text().splitlines() if line.strip()}


def test_resume_runs_only_unrecorded_cases_and_reports_all(tmp_path):
    suites = _suites(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    proc = _run("--suites", str(suites), "--out", str(first))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _ran(first) == {"test_even[8]", "test_even[16]", "test_even[24]", "test_broken"}
    # the first run was cut before two of its cases: drop their records
    for rec in (first / "raw").glob("peer-*.jsonl"):
        keep = [ln for ln in rec.read_text().splitlines()
                if not any(k in ln for k in ("test_even[16]", "test_broken"))]
        rec.write_text("\n".join(keep) + "\n")

    proc = _run("--suites", str(suites), "--out", str(second), "--resume", str(first))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _ran(second) == {"test_even[16]", "test_broken"}
    rep = json.loads((second / "conformance.json").read_text())
    assert rep["totals"]["passed"] == 3 and rep["totals"]["failed"] == 1 and rep["totals"]["not_run"] == 0
    assert rep["meta"]["resumed_cases"] == 2


def test_resume_without_collection_names_the_file(tmp_path):
    suites = _suites(tmp_path)
    proc = _run("--suites", str(suites), "--out", str(tmp_path / "o"), "--resume", str(tmp_path / "nothing"))
    assert proc.returncode != 0 and "peer-collect.json" in proc.stderr

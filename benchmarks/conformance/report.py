"""Per-test-function table of a conformance run (Markdown + JSON) and the list of failing cases.

Counts per function: ``collected`` (all parametrizations), ``excluded`` (outside pagoda's claim, by
reason), ``in_claim``, ``selected`` (in-claim cases the run took), ``passed`` (``passed_fwd``: forward
assertions passed, the backward part is outside the claim), ``failed``, ``skipped`` (by the test itself;
``skipped_oom`` separately), ``not_run`` (time budget). The pass rate inside the claim is
``(passed + passed_fwd) / (passed + passed_fwd + failed)``.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from classify import outcome

_MISSING = re.compile(r"ShimMissingName: pagoda has no counterpart of `([^`]+)`")
_COLUMNS = ("collected", "excluded", "in_claim", "selected", "passed", "passed_fwd", "failed", "skipped",
            "skipped_oom", "not_run")


def load_records(paths: list[Path]) -> dict[str, dict]:
    """The last record per node id from the plugin's JSONL files."""
    records: dict[str, dict] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                records[rec["nodeid"]] = rec
    return records


def _rate(row: dict) -> float | None:
    ok = row["passed"] + row["passed_fwd"]
    den = ok + row["failed"]
    return ok / den if den else None


def aggregate(suites: dict[str, dict]) -> dict:
    """Build the report.

    suites: name -> {"population": "file::function" -> {"collected", "in_claim", "excluded_by"},
                     "cases": sampled cases (nodeid, file, function, excluded, role),
                     "records": nodeid -> plugin record, "errors": collection errors, "manifest": MANIFEST entry}
    """
    rows, failures, excluded_runs, collect_errors = [], [], [], []
    missing = Counter()
    for name, s in suites.items():
        table: dict[str, dict] = {}
        for key, pop in s.get("population", {}).items():
            table[key] = {**{c: 0 for c in _COLUMNS}, "collected": pop["collected"], "in_claim": pop["in_claim"],
                          "excluded": pop["collected"] - pop["in_claim"], "excluded_by": dict(pop["excluded_by"])}
        for case in s["cases"]:
            key = f"{case['file']}::{case['function']}"
            row = table.setdefault(key, {**{c: 0 for c in _COLUMNS}, "excluded_by": {}})
            rec = s["records"].get(case["nodeid"])
            result = "not_run" if rec is None else outcome(rec["raw"], rec.get("skip_reason"))
            entry = {"suite": name, "nodeid": case["nodeid"], "outcome": result,
                     "error": (rec or {}).get("error") or (rec or {}).get("skip_reason"),
                     "where": (rec or {}).get("where"), "deepest": (rec or {}).get("deepest")}
            if case.get("role") == "excluded":
                excluded_runs.append({**entry, "reasons": case["excluded"]})
                continue
            row["selected"] += 1
            row[result] += 1
            if result == "failed":
                failures.append(entry)
                m = _MISSING.search(entry["error"] or "")
                if m:
                    missing[m.group(1)] += 1
        for key, row in sorted(table.items()):
            file, function = key.split("::", 1)
            rows.append({"suite": name, "file": file, "function": function, **{c: row[c] for c in _COLUMNS},
                         "excluded_by": row["excluded_by"], "pass_rate": _rate(row)})
        collect_errors += [{"suite": name, **e} for e in s.get("errors", [])]
    totals = {c: sum(r[c] for r in rows) for c in _COLUMNS}
    totals["pass_rate"] = _rate(totals)
    by_suite = {}
    for name in suites:
        sub = {c: sum(r[c] for r in rows if r["suite"] == name) for c in _COLUMNS}
        sub["pass_rate"] = _rate(sub)
        by_suite[name] = sub
    reasons = Counter()
    for r in rows:
        reasons.update(r["excluded_by"])
    return {"rows": rows, "totals": totals, "by_suite": by_suite, "excluded_by_reason": dict(reasons),
            "failures": failures, "excluded_runs": excluded_runs, "collect_errors": collect_errors,
            "missing_names": dict(missing.most_common()),
            "suites": {n: s.get("manifest", {}) for n, s in suites.items()}}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def render_markdown(rep: dict, meta: dict) -> str:
    """The Markdown report: totals, per-function table, failing cases, excluded samples."""
    t = rep["totals"]
    out = ["# Peer test suites against pagoda (shim: import changed only)", ""]
    for name, m in rep["suites"].items():
        out.append(f"- {name}: {m.get('repo', '?')} {m.get('tag', '?')} `{m.get('commit', '?')}`")
    took = ("cut short; this report written afterwards from its records (run.py --report-only)"
            if meta.get("report_only") else f"{meta.get('wall_s', 0):.0f} s")
    out += [f"- run: {meta.get('device', '?')}; {took}; per function ≤ "
            f"{meta.get('per_function')} in-claim cases (covering every parameter value first, seed "
            f"{meta.get('seed')}); {meta.get('workers')} worker processes", ""]
    out += [f"**Inside the claim: {t['passed'] + t['passed_fwd']} passed ({t['passed_fwd']} forward-only), "
            f"{t['failed']} failed, {t['skipped']} skipped by the test, {t['skipped_oom']} skipped (OOM), "
            f"{t['not_run']} not run (budget): pass rate {_pct(t['pass_rate'])}.** "
            f"Collected {t['collected']}; in claim {t['in_claim']}, of which {t['selected']} selected; "
            f"excluded {t['excluded']}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(rep["excluded_by_reason"].items())) + ".", ""]
    for name, s in rep["by_suite"].items():
        out.append(f"- {name}: {s['passed'] + s['passed_fwd']}/{s['passed'] + s['passed_fwd'] + s['failed']} "
                   f"({_pct(s['pass_rate'])})")
    out += ["", "| suite | file | function | collected | excluded | in claim | run | passed (fwd) | failed | "
            "skipped | not run | pass rate |", "|" + "---|" * 12]
    for r in rep["rows"]:
        exc = f"{r['excluded']}" + (f" ({', '.join(f'{k} {v}' for k, v in r['excluded_by'].items())})"
                                    if r["excluded"] else "")
        fwd = f" ({r['passed_fwd']})" if r["passed_fwd"] else ""
        out.append(f"| {r['suite']} | {r['file'].split('/')[-1]} | {r['function']} | {r['collected']} | {exc} | "
                   f"{r['in_claim']} | {r['selected']} | {r['passed'] + r['passed_fwd']}{fwd} | {r['failed']} | "
                   f"{r['skipped'] + r['skipped_oom']} | {r['not_run']} | {_pct(r['pass_rate'])} |")
    if rep["collect_errors"]:
        out += ["", "## Collection errors", ""] + [f"- `{e['nodeid']}`: {e['error']}" for e in rep["collect_errors"]]
    if rep["missing_names"]:
        out += ["", "## Names pagoda lacks (failing cases per name)", ""]
        out += [f"- `{k}`: {v}" for k, v in rep["missing_names"].items()]
    out += ["", f"## Failing cases inside the claim ({len(rep['failures'])})", ""]
    out += [f"- `{f['nodeid']}`: {f['error']} ({f['where']})" for f in rep["failures"]]
    out += ["", f"## Excluded cases run to show the error a user gets ({len(rep['excluded_runs'])})", ""]
    out += [f"- `{e['nodeid']}` [{', '.join(e['reasons'])}] {e['outcome']}: {e['error']}"
            for e in rep["excluded_runs"]]
    return "\n".join(out) + "\n"


def write(rep: dict, meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "conformance.json").write_text(json.dumps({"meta": meta, **rep}, indent=1) + "\n")
    (out / "conformance.md").write_text(render_markdown(rep, meta))

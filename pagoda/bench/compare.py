"""``pagoda bench compare A.json B.json``: ratios between two runs of the same study."""
from __future__ import annotations

import json
from pathlib import Path

from pagoda.bench import report as _report

# Measured fields; every other field of a result row identifies the case.
_MEASURES = {"status", "reason", "ms", "tflops", "tokens_per_s", "peak_mem_mb", "gbps", "tb_per_s", "us"}
# Higher is better for these; for "ms"/"us" the ratio is inverted so that > 1 always means B is faster.
_PREFERRED = ["tflops", "tokens_per_s", "tb_per_s", "gbps", "ms", "us"]


def _key(row: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in row.items() if k not in _MEASURES))


def _metric(rows_a: list[dict], rows_b: list[dict]) -> str:
    for m in _PREFERRED:
        if any(r.get(m) is not None for r in rows_a) and any(r.get(m) is not None for r in rows_b):
            return m
    raise ValueError("the two reports share no measured field (tflops, tokens_per_s, ms, ...)")


def compare(path_a: str | Path, path_b: str | Path, markdown: bool = False) -> str:
    """A table of every case present in both reports with its metric in A, in B, and B's speed-up over A."""
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    if a.get("study") != b.get("study"):
        raise ValueError(f"reports are of different studies: {a.get('study')!r} vs {b.get('study')!r}")
    metric = _metric(a["results"], b["results"])
    index_b = {_key(r): r for r in b["results"]}
    rows = []
    for ra in a["results"]:
        rb = index_b.get(_key(ra))
        if rb is None:
            continue
        va, vb = ra.get(metric), rb.get(metric)
        ratio = "-"
        if va and vb:
            ratio = f"{(va / vb if metric in ('ms', 'us') else vb / va):.2f}x"
        case = ", ".join(f"{k}={v}" for k, v in ra.items() if k not in _MEASURES)
        rows.append([case, va if va is not None else ra.get("status"), vb if vb is not None else rb.get("status"),
                     ratio])
    if not rows:
        raise ValueError("no case appears in both reports")
    da, db = a["meta"], b["meta"]
    head = (f"A: {path_a} ({da.get('device_name')}, torch {da.get('torch')}, {da.get('date')})\n"
            f"B: {path_b} ({db.get('device_name')}, torch {db.get('torch')}, {db.get('date')})\n"
            f"metric: {metric}; ratio > 1 means B is faster\n")
    headers = ["case", f"A {metric}", f"B {metric}", "B vs A"]
    table = _report.markdown_table(headers, rows) if markdown else _report.format_table(headers, rows, 1)
    return head + "\n" + table

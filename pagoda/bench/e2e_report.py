"""Tables of the e2e study (`pagoda.bench.e2e`): tokens/s per implementation and batch, one table per
cache x logits processor, then the max-batch search, the pagoda-vs-SDPA agreement, the host time per
attention call and what could not run."""
from __future__ import annotations

from pagoda.bench import e2e_sampling
from pagoda.bench import report as _report


def _ratio_cells(cells: dict) -> str:
    others = [c["tokens_per_s"] for n, c in cells.items() if n != "pagoda" and c["status"] == "ok"]
    pg = cells.get("pagoda")
    return f"{pg['tokens_per_s'] / max(others):.2f}x" if pg and pg["status"] == "ok" and others else "-"


PAIRED_MIN = 3   # paired rounds a competitor needs to enter the paired reading


def paired_ratios(report: dict) -> dict:
    """Per (cache, processor, batch) cell: the median over timing rounds of ``other_ms[r] / pagoda_ms[r]``
    for each other implementation with at least PAIRED_MIN samples (rounds are taken in turn across
    implementations, so a round's samples share the host's drift), and the smallest of those medians
    ("pagoda / toughest other, paired"). A reading beside the tokens/s ratio of medians, not a criterion."""
    samples = report.get("samples_ms") or {}
    out = {}
    for label, pg in samples.items():
        impl, cache, proc, batch = label.split("/")
        if impl != "pagoda" or len(pg) < PAIRED_MIN:
            continue
        per = {}
        for other, ms in samples.items():
            o_impl, *rest = other.split("/")
            if o_impl == "pagoda" or rest != [cache, proc, batch] or len(ms) < PAIRED_MIN:
                continue
            n = min(len(ms), len(pg))
            ratios = sorted(ms[r] / pg[r] for r in range(n))
            per[o_impl] = round((ratios[(n - 1) // 2] + ratios[n // 2]) / 2, 3)
        if per:
            out[(cache, proc, int(batch[1:]))] = {"vs": per, "toughest": min(per.values())}
    return out


def tables(report: dict, markdown: bool = False) -> str:
    """Tokens/s per implementation (columns) and batch (rows), one table per cache x processor."""
    names = [n for n, b in report["backends"].items() if b["available"]]
    out = []
    rows_all = report["results"]
    for cache, proc in sorted({(r["cache"], r["processor"]) for r in rows_all}):
        headers = ["batch"] + names + ["pagoda / best other"]
        rows = []
        for batch in sorted({r["batch"] for r in rows_all}):
            cells = {r["impl"]: r for r in rows_all
                     if r["cache"] == cache and r["processor"] == proc and r["batch"] == batch}
            row = [batch]
            for n in names:
                c = cells.get(n)
                row.append("-" if c is None else (f"{c['tokens_per_s']:.1f}" if c["status"] == "ok" else c["status"]))
            row.append(_ratio_cells(cells))
            rows.append(row)
        title = f"{report['meta']['model']}: tokens/s, cache={cache}, logits processor={proc}"
        table = _report.markdown_table(headers, rows) if markdown else _report.format_table(headers, rows, 0)
        out.append((f"### {title}\n\n" if markdown else title + "\n") + table)
    out += e2e_sampling.tables(report, markdown)
    paired = paired_ratios(report)
    if paired:
        lines = [f"{c}/{p}/b{b}: {v['toughest']:.2f}x (" + ", ".join(f"{k} {r:.2f}x" for k, r in v["vs"].items()) + ")"
                 for (c, p, b), v in sorted(paired.items())]
        out.append("pagoda / toughest other, paired rounds (median over rounds of other ms / pagoda ms):\n"
                   + "\n".join(("- " if markdown else "  ") + line for line in lines))
    breaks = [f"{r['impl']} b{r['batch']}: {r['graph_breaks']}" for r in rows_all if "graph_breaks" in r]
    if breaks:
        out.append("Graph breaks in the compiled decode step (counted over its warm-up generate): " + ", ".join(breaks))
    mb = report.get("max_batch")
    if isinstance(mb, dict) and mb:
        def fmt(v):
            if not isinstance(v, dict):
                return str(v)
            s = str(v.get("max_batch"))
            if v.get("complete") and v.get("first_oom") is None and v.get("max_batch"):
                s = f">= {s} (no OOM up to the limit)"
            elif not v.get("complete"):
                s = f">= {s} (search stopped: {v.get('note')})"
            return s
        prompt = next((v.get("prompt_len") for v in mb.values() if isinstance(v, dict) and v.get("prompt_len")), None)
        out.append(f"Max batch before OOM (prompt {prompt}, 2 new tokens, dynamic cache): "
                   + ", ".join(f"{k}={fmt(v)}" for k, v in mb.items()))
    agree = report.get("agreement")
    if isinstance(agree, dict) and agree:
        out.append("pagoda vs sdpa, same padded prompts (generate scores, relative error): " + ", ".join(
            f"{c}: {v['rel_err_scores']:.2e} over {v['steps_compared']} steps, tokens "
            f"{'equal' if v['tokens_equal'] else 'differ'}" if isinstance(v, dict) else f"{c}: {v}"
            for c, v in agree.items()))
    host = report.get("host_overhead")
    if isinstance(host, dict) and isinstance(host.get("us_per_call"), dict):
        how = "kernel launch stubbed, CPU" if host.get("stubbed_launch") else "real calls"
        out.append(f"Host time of one attention call (decode, b={host.get('batch')}, {how}): "
                   + ", ".join(f"{k}: {v} µs" if isinstance(v, (int, float)) else f"{k}: {v}"
                               for k, v in host["us_per_call"].items()))
        if isinstance(host.get("pagoda_profile"), list):
            out.append("pagoda's call, own time per call (cProfile):\n" + "\n".join(
                ("    " if markdown else "  ") + line for line in host["pagoda_profile"]))
    reasons = [f"{n}: {b['reason']}" for n, b in report["backends"].items() if not b["available"]]
    errors = sorted({f"{r['impl']}: {r['reason']}" for r in rows_all if r["status"] != "ok"})
    for title, items in (("Unavailable", reasons), ("Failures and skips", errors)):
        if items:
            out.append(f"{title}:\n" + "\n".join(("- " if markdown else "  ") + i for i in items))
    return "\n\n".join(out)

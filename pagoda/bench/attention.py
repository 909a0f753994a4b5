"""The prefill-attention study: TFLOP/s, time and peak memory of every backend over a grid of shapes.

GPU grid (flash-attention's benchmark): (batch, seqlen) in (32,512) ... (1,16384) at 16k tokens,
hidden size 2048 (nheads = 2048 / head_dim), head dims 64 and 128, causal and not. The CPU grid is
a small embedded one that finishes in well under a minute.

Every figure is a median with its spread (interquartile range over the median, `timing.time_stats`);
the tables print the median and one line on the spread. torch.compile'd peers (FlexAttention) are
compiled for every shape and watched for graph breaks and eager fallbacks (`pagoda.bench.compiled`).
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import asdict, dataclass

import torch

from pagoda.bench import report as _report
from pagoda.bench.backends import ATTENTION_BACKENDS, attention_flops, default_scale
from pagoda.bench.compiled import CompileWatch, silently_eager, users_compile
from pagoda.bench.progress import Progress
from pagoda.bench.timing import cpu_clock, peak_extra_mb, time_stats

CPU_REP_MS = 200.0   # CPU: wall time spent timing each (case, backend) beyond the minimum number of runs


@dataclass(slots=True, frozen=True)
class AttentionCase:
    batch: int
    seqlen: int
    nheads: int
    head_dim: int
    causal: bool
    nheads_kv: int = 0  # 0 = same as nheads

    def __post_init__(self):
        if min(self.batch, self.seqlen, self.nheads, self.head_dim) <= 0:
            raise ValueError(f"AttentionCase sizes must be positive, got {self}")

    @property
    def kv_heads(self) -> int:
        return self.nheads_kv or self.nheads

    def label(self) -> str:
        return f"d={self.head_dim} {'causal' if self.causal else 'full'} b={self.batch} s={self.seqlen}"


FULL_BATCH_SEQLEN = [(32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)]
SMALL_BATCH_SEQLEN = [(4, 128), (2, 256), (1, 512)]


def attention_grid(name: str, hidden: int = 2048, head_dims=(64, 128)) -> list[AttentionCase]:
    """``full``: the flash-attention grid; ``small``: the embedded CPU default (hidden 256)."""
    if name == "full":
        pairs = FULL_BATCH_SEQLEN
    elif name == "small":
        pairs, hidden = SMALL_BATCH_SEQLEN, min(hidden, 256)
    else:
        raise ValueError(f"grid must be 'full' or 'small', got {name!r}")
    return [AttentionCase(b, s, hidden // d, d, causal)
            for d in head_dims for causal in (False, True) for b, s in pairs]


def _classify(exc: BaseException) -> tuple[str, str]:
    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom", msg
    if isinstance(exc, (NotImplementedError, RuntimeError, ValueError)) and (
            "No available kernel" in str(exc) or isinstance(exc, NotImplementedError)):
        return "unsupported", msg
    return "error", msg


def run_case(case: AttentionCase, backend_names: list[str], device: torch.device, dtype: torch.dtype,
             unavailable: dict[str, str | None]) -> list[dict]:
    """Time every backend on one case (same random inputs for all); one result row per backend."""
    q = torch.randn(case.batch, case.seqlen, case.nheads, case.head_dim, device=device, dtype=dtype)
    k = torch.randn(case.batch, case.seqlen, case.kv_heads, case.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    flops = attention_flops(case.batch, case.seqlen, case.seqlen, case.nheads, case.head_dim, case.causal)
    rows = []
    for name in backend_names:
        row = {**asdict(case), "backend": name, "dtype": str(dtype).replace("torch.", ""),
               "status": "ok", "reason": None, "ms": None, "spread": None, "tflops": None, "peak_mem_mb": None}
        if unavailable.get(name):
            row.update(status="unavailable", reason=unavailable[name])
            rows.append(row)
            continue
        backend = ATTENTION_BACKENDS[name]
        watch = CompileWatch() if backend.compiled else None
        try:
            fn = backend.prepare(q, k, v, case.causal, default_scale(case.head_dim))
            fn()  # compile / autotune / warm up outside timing
            rep_ms = 100.0 if device.type == "cuda" else CPU_REP_MS
            ms, spread = time_stats(fn, device, rep_ms=rep_ms)
            row.update(ms=round(ms, 5), spread=round(spread, 4), tflops=round(flops / ms / 1e9, 6),
                       peak_mem_mb=None if (m := peak_extra_mb(fn, device)) is None else round(m, 1))
            del fn
        except Exception as exc:  # one backend failing must not stop the study
            status, reason = _classify(exc)
            row.update(status=status, reason=reason)
        if watch is not None:
            row["compile"] = watch.delta()
            why = silently_eager(row["compile"])
            if why and row["status"] == "ok":   # a figure of partly eager code is not the peer's figure
                row.update(status="error", reason=why, ms=None, spread=None, tflops=None)
        rows.append(row)
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def run_study(grid: str, backends: list[str] | None, device: torch.device, dtype: torch.dtype,
              head_dims=(64, 128)) -> dict:
    names = backends or list(ATTENTION_BACKENDS)
    unknown = [n for n in names if n not in ATTENTION_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; known: {sorted(ATTENTION_BACKENDS)}")
    unavailable = {n: ATTENTION_BACKENDS[n].unavailable(device) for n in names}
    cases = attention_grid(grid, head_dims=head_dims)
    results: list[dict] = []
    compiled = any(ATTENTION_BACKENDS[n].compiled and not unavailable[n] for n in names)
    with (users_compile() if compiled else contextlib.nullcontext(None)) as dynamo, \
            Progress(len(cases), "attention") as bar:
        for case in cases:
            results += run_case(case, names, device, dtype, unavailable)
            bar.step(case.label())
    return {
        "study": "attention",
        "meta": {**_report.environment(device), "grid": grid, "dtype": str(dtype).replace("torch.", ""),
                 "flops": "4*b*s^2*h*d, halved when causal",
                 "timing": "median; spread = interquartile range / median ("
                           + ("triton do_bench, L2 flushed" if device.type == "cuda" else
                              f"{cpu_clock()}, >= 10 runs and >= {CPU_REP_MS:.0f} ms per figure") + ")",
                 "clock": None if device.type == "cuda" else cpu_clock(), "dynamo": dynamo},
        "backends": {n: {"available": unavailable[n] is None, "reason": unavailable[n],
                         "describe": ATTENTION_BACKENDS[n].describe} for n in names},
        "results": results,
    }


def _cell(row: dict) -> str:
    if row["status"] == "ok":
        t = row["tflops"]
        return f"{t:.1f}" if t >= 10 else f"{t:.3g}"
    return {"unavailable": "n/a", "unsupported": "unsup", "oom": "OOM"}.get(row["status"], "err")


def tables(report: dict, markdown: bool = False) -> str:
    """One table per (head_dim, causal): TFLOP/s per backend, pagoda's ratios, pagoda's peak memory."""
    # Backends that run nowhere here get no column; they are listed with their reason below the tables.
    names = [n for n, b in report["backends"].items() if b["available"]]
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in report["results"]:
        key = (r["head_dim"], r["causal"], r["batch"], r["seqlen"], r["nheads"])
        by_case.setdefault(key, {})[r["backend"]] = r
    ratio_peers = [p for p in ("sdpa_cudnn", "sdpa_flash", "flashinfer") if p in names and "pagoda" in names]
    out = []
    for d, causal in sorted({(k[0], k[1]) for k in by_case}):
        headers = ["batch", "seqlen"] + names + [f"pagoda/{p}" for p in ratio_peers] + ["pagoda MiB"]
        rows = []
        for key in sorted((k for k in by_case if k[0] == d and k[1] == causal), key=lambda k: (k[3], k[2])):
            cells = by_case[key]
            row = [key[2], key[3]] + [_cell(cells[n]) for n in names]
            pg = cells.get("pagoda", {})
            for p in ratio_peers:
                pr = cells.get(p, {})
                ok = pg.get("status") == "ok" and pr.get("status") == "ok"
                row.append(f"{pg['tflops'] / pr['tflops']:.2f}x" if ok else "-")
            row.append(pg.get("peak_mem_mb"))
            rows.append(row)
        title = f"head_dim={d} {'causal' if causal else 'non-causal'}, TFLOP/s ({report['meta']['dtype']})"
        if report["meta"].get("clock"):
            title += f", {report['meta']['clock']}"
        if markdown:
            out.append(f"### {title}\n\n" + _report.markdown_table(headers, rows))
        else:
            out.append(title + "\n" + _report.format_table(headers, rows, align_left=0))
    spreads = [(r["spread"], r) for r in report["results"] if r["status"] == "ok" and r.get("spread") is not None]
    if spreads:
        spreads.sort(key=lambda t: t[0])
        w = spreads[-1][1]
        where = AttentionCase(w["batch"], w["seqlen"], w["nheads"], w["head_dim"], w["causal"]).label()
        out.append(f"Spread (interquartile range / median) over {len(spreads)} figures: median "
                   f"{spreads[len(spreads) // 2][0]:.1%}, largest {w['spread']:.1%} ({w['backend']}, {where})")
    watched = [r for r in report["results"] if "compile" in r]
    for name in sorted({r["backend"] for r in watched}):
        mine = [r["compile"] for r in watched if r["backend"] == name]
        total = {k: sum(c[k] for c in mine) for k in mine[0]}
        out.append(f"{name} compiles: {total['graphs']} graphs over {len(mine)} cases, "
                   f"{total['graph_breaks']} graph breaks, {total['eager_fallbacks']} eager fallbacks")
    reasons = [f"{n}: {b['reason']}" for n, b in report["backends"].items() if not b["available"]]
    if reasons:
        out.append(("Unavailable backends:\n" if not markdown else "Unavailable backends:\n\n")
                   + "\n".join(("- " if markdown else "  ") + r for r in reasons))
    errors = sorted({f"{r['backend']}: {r['reason']}" for r in report["results"]
                     if r["status"] in ("error", "unsupported", "oom")})
    if errors:
        out.append("Failures:\n" + "\n".join(("- " if markdown else "  ") + e for e in errors))
    return "\n\n".join(out)

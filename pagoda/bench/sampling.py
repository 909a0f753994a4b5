"""The sampling study: time per call of every sampler, beside PyTorch's sort-based samplers, FlashInfer
and the read-once floor, over a (vocab, batch) grid.

GPU grid: vocab 32,000 / 128,256 / 151,936 x batch 1 / 32 / 128 / 512, float32
probabilities (FlashInfer's samplers take float32). CPU grid: a small embedded one (seconds), where
pagoda runs its sort-based reference. The floor is one read of the probabilities (``amax`` over each
row): its achieved GB/s is reported, and every sampler's time is also given as GB/s of that same
read, so "x floor" is a ratio of times on identical bytes.

Two figures per call on CUDA, both medians with L2 flushed between runs:
    graph_us  device time: one call captured in a CUDA graph and replayed (`timing.graph_time_ms`), the
              Philox seed/offset passed as device tensors (how a serving engine runs a sampler inside its
              captured decode step); the mean over GRAPH_SEEDS seeds, each captured and replayed on its
              own (a replay repeats one draw; rejection-based samplers cost what their draws cost). The
              headline ``us`` and the comparisons use it whenever both sides have it: at these µs-scale
              calls it is what separates the kernels, where
    eager_us  one Python call (`timing.time_ms`) also holds the host's launch path, and moved by up to
              ±45 % between two H200 runs at batch 1-32.
On the CPU only ``eager_us`` exists.
"""
from __future__ import annotations

import gc
import importlib
from dataclasses import asdict, dataclass

import torch

from pagoda.bench import report as _report
from pagoda.bench.attention import _classify
from pagoda.bench.backends import needs_module
from pagoda.bench.budget import case_limit, run_cases
from pagoda.bench.timing import graph_time_ms, time_ms

TOP_P, TOP_K, MIN_P = 0.9, 50, 0.05
PASSES = 2          # timing rounds per case (best median kept, see run_case)
OPS = ("sampling", "top_p", "top_k", "min_p", "top_k_top_p")
FULL_VOCABS, FULL_BATCHES = (32000, 128256, 151936), (1, 32, 128, 512)
SMALL_VOCABS, SMALL_BATCHES = (1000, 4096), (1, 8)


@dataclass(slots=True, frozen=True)
class SamplingCase:
    batch: int
    vocab: int

    def __post_init__(self):
        if self.batch <= 0 or self.vocab <= 0:
            raise ValueError(f"SamplingCase sizes must be positive, got {self}")

    def label(self) -> str:
        return f"V={self.vocab} b={self.batch}"


def sampling_grid(name: str) -> list[SamplingCase]:
    """``full``: the GPU grid; ``small``: the embedded CPU default."""
    if name == "full":
        vocabs, batches = FULL_VOCABS, FULL_BATCHES
    elif name == "small":
        vocabs, batches = SMALL_VOCABS, SMALL_BATCHES
    else:
        raise ValueError(f"grid must be 'full' or 'small', got {name!r}")
    return [SamplingCase(b, v) for v in vocabs for b in batches]


# ------------------------------------------------------------------------------------------- backends

def _rng(gen, seed, offset) -> dict:
    """The randomness keywords of a FlashInfer-style sampler call: a generator, or (for a captured graph)
    an explicit Philox seed/offset pair of device tensors."""
    return {"generator": gen} if seed is None else {"seed": seed, "offset": offset}


def _prep_pagoda(op, probs, gen, seed=None, offset=None):
    from pagoda.ops import sampling as s

    kw = _rng(gen, seed, offset)
    calls = {
        "sampling": lambda: s.sampling_from_probs(probs, **kw),
        "top_p": lambda: s.top_p_sampling_from_probs(probs, TOP_P, **kw),
        "top_k": lambda: s.top_k_sampling_from_probs(probs, TOP_K, **kw),
        "min_p": lambda: s.min_p_sampling_from_probs(probs, MIN_P, **kw),
        "top_k_top_p": lambda: s.top_k_top_p_sampling_from_probs(probs, TOP_K, TOP_P, **kw),
    }
    return calls[op]


def torch_sort_sample(probs: torch.Tensor, op: str, gen=None) -> torch.Tensor:
    """What serving stacks do without a fused sampler: sort each row, cut by cumulative mass / rank /
    ratio to the maximum, ``torch.multinomial`` over the survivors, map back through the sort order."""
    if op == "sampling":
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_p, dtype=torch.bool)
    if op in ("top_p", "top_k_top_p"):
        kept = sorted_p.clone()
        if op == "top_k_top_p":  # top-k first, then top-p on the renormalised survivors
            kept[:, TOP_K:] = 0
        csum = kept.cumsum(-1)
        drop |= (csum - kept) >= TOP_P * csum[:, -1:]
    if op in ("top_k", "top_k_top_p"):
        drop[:, TOP_K:] = True
    if op == "min_p":
        drop |= sorted_p < MIN_P * sorted_p[:, :1]
    choice = torch.multinomial(sorted_p.masked_fill(drop, 0.0), 1, generator=gen)
    return order.gather(1, choice).squeeze(1)


def _prep_torch(op, probs, gen, seed=None, offset=None):
    # Under capture torch.multinomial draws from the default generator (graph-safe); it takes no seed.
    return lambda: torch_sort_sample(probs, op, gen if seed is None else None)


def _prep_flashinfer(op, probs, gen, seed=None, offset=None):
    fs = importlib.import_module("flashinfer.sampling")
    if op in ("top_k", "top_k_top_p"):
        raise NotImplementedError("FlashInfer's top-k samplers are not run: their JIT build takes too long")
    kw = _rng(gen, seed, offset)
    calls = {
        "sampling": lambda: fs.sampling_from_probs(probs, **kw),
        "top_p": lambda: fs.top_p_sampling_from_probs(probs, TOP_P, **kw),
        "min_p": lambda: fs.min_p_sampling_from_probs(probs, MIN_P, **kw),
    }
    return calls[op]


def _flashinfer_unavailable(device):
    return needs_module("flashinfer.sampling")(device)


BACKENDS = {
    "pagoda": ("pagoda.ops.sampling (Triton on CUDA, sort-based reference elsewhere)", lambda d: None, _prep_pagoda),
    "torch_sort": ("PyTorch sort + cumsum + multinomial", lambda d: None, _prep_torch),
    "flashinfer": ("flashinfer.sampling (top-k samplers excluded)", _flashinfer_unavailable, _prep_flashinfer),
}


# ---------------------------------------------------------------------------------------------- study

def _timing(device):
    return {"warmup_ms": 25, "rep_ms": 100} if device.type == "cuda" else {"warmup_ms": 5, "rep_ms": 10}


GRAPH_SEEDS = 8     # graph timing: mean over this many Philox seeds (see _seeded_graph_ms)


def _seeded_graph_ms(fn, seed_t: torch.Tensor, device: torch.device) -> float:
    """Mean over GRAPH_SEEDS seeds of the graph-replayed time of ``fn`` (which reads its Philox seed from
    the device tensor ``seed_t``). A replayed graph repeats one draw, and the cost of a rejection-based
    sampler (pagoda's redraws and top-p rounds, FlashInfer's rounds) depends on the draw: one seed would
    time one draw, not the expected cost. The same seeds for every backend."""
    total = 0.0
    for sd in range(GRAPH_SEEDS):
        seed_t.fill_(sd)
        total += graph_time_ms(fn, device, warmup_ms=5, rep_ms=15)
    seed_t.zero_()
    return total / GRAPH_SEEDS


_sig = _report.significant


def _best(row: dict, key: str, ms: float) -> None:
    if row.get(key) is None or ms * 1e3 < row[key]:
        row[key] = _sig(ms * 1e3)


def run_case(case: SamplingCase, names: list[str], device: torch.device, dtype: torch.dtype,
             unavailable: dict[str, str | None]) -> list[dict]:
    """Time every backend on every op for one case (same random probabilities for all).

    Every call (the floor included) is timed in PASSES rounds, in turn, keeping its best median: at batch 1
    a call's host time is close to what ``do_bench``'s L2 flush hides, and the first call timed after the
    case's inputs were built read up to 3x slow (on an H200, V=32000 b=1 plain sampling read 34.6 µs in
    one round, against 10.7 µs at b=32 in the same run). On CUDA each call is also captured in a CUDA
    graph and its replay timed (``graph_us``, the headline ``us`` when the capture works)."""
    logits = torch.randn(case.batch, case.vocab, device=device) * 3.0
    probs = torch.softmax(logits, -1).to(dtype)
    nbytes = probs.numel() * probs.element_size()
    cuda = device.type == "cuda"
    seed_t = torch.zeros(1, dtype=torch.int64, device=device)   # the graph's Philox state, on the device
    offset_t = torch.zeros(1, dtype=torch.int64, device=device)
    rows, fns, graph_fns = [], {}, {}
    for op in OPS:
        for name in names:
            row = {**asdict(case), "op": op, "backend": name, "dtype": str(dtype).replace("torch.", ""),
                   "status": "ok", "reason": None, "us": None, "gbps": None, "eager_us": None,
                   "graph_us": None, "graph_error": None}
            rows.append(row)
            if unavailable.get(name):
                row.update(status="unavailable", reason=unavailable[name])
                continue
            try:
                gen = torch.Generator(device=device).manual_seed(0)
                fn = BACKENDS[name][2](op, probs, gen)
                out = fn()  # compile / warm up outside timing
                if not ((out >= 0) & (out < case.vocab)).all():
                    raise RuntimeError("returned a token id outside [0, vocab)")
                fns[id(row)] = fn
                if cuda:
                    graph_fns[id(row)] = BACKENDS[name][2](op, probs, None, seed_t, offset_t)
            except Exception as exc:  # one backend failing must not stop the study
                row.update(zip(("status", "reason"), _classify(exc), strict=False))
    floor = {}
    amax = lambda: torch.amax(probs, -1)  # noqa: E731
    for _ in range(PASSES):
        _best(floor, "eager_us", time_ms(amax, device, **_timing(device)))
        if cuda:
            _best(floor, "graph_us", graph_time_ms(amax, device, **_timing(device)))
        for row in rows:
            fn = fns.get(id(row))
            if fn is None or row["status"] != "ok":
                continue
            try:
                _best(row, "eager_us", time_ms(fn, device, **_timing(device)))
            except Exception as exc:
                row.update(zip(("status", "reason"), _classify(exc), strict=False))
                continue
            gfn = graph_fns.get(id(row))
            if gfn is not None:
                try:
                    _best(row, "graph_us", _seeded_graph_ms(gfn, seed_t, device))
                except Exception as exc:  # not capturable: the row keeps its eager figure only
                    graph_fns.pop(id(row))
                    row["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
                    torch.cuda.synchronize(device)
    floor_us = floor.get("graph_us") or floor["eager_us"]
    for row in rows:
        row.update(floor_us=floor_us, floor_eager_us=floor["eager_us"], floor_graph_us=floor.get("graph_us"),
                   floor_gbps=_sig(nbytes / (floor_us * 1e-6) / 1e9))
        if row["status"] == "ok":
            us = row["graph_us"] or row["eager_us"]
            row.update(us=us, timing="graph" if row["graph_us"] else "eager",
                       gbps=_sig(nbytes / (us * 1e-6) / 1e9))
    fns.clear()
    graph_fns.clear()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def run_study(grid: str, backends: list[str] | None, device: torch.device, dtype: torch.dtype = torch.float32,
              budget_s: float | None = None) -> dict:
    """Run the sampling study; returns the report (``study``, ``meta``, ``backends``, ``results``).

    ``budget_s``: no case starts once this many seconds have passed (the first case always runs), so that a
    bounded run still leaves its data; the cases not run are listed in the report."""
    names = backends or list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; known: {sorted(BACKENDS)}")
    unavailable = {n: BACKENDS[n][1](device) for n in names}
    cases = sampling_grid(grid)
    limit = case_limit(budget_s)
    results, skipped = run_cases(cases, "sampling", limit, lambda c: run_case(c, names, device, dtype, unavailable))
    return {
        "study": "sampling",
        "meta": {**_report.environment(device), "grid": grid, "dtype": str(dtype).replace("torch.", ""),
                 "params": {"top_p": TOP_P, "top_k": TOP_K, "min_p": MIN_P},
                 "floor": "one read of the probabilities (torch.amax over rows); gbps = probability bytes / time",
                 "timing": f"us = graph_us (CUDA-graph replay of one call, L2 flushed; mean over {GRAPH_SEEDS} "
                           "Philox seeds, each its own graph) where captured, else eager_us (triton do_bench of the "
                           "Python call, the generator advancing); ratios compare the same method on both sides",
                 "skipped_cases": skipped,
                 "skipped_why": f"started past --budget-s {limit:g}" if skipped else None},
        "backends": {n: {"available": unavailable[n] is None, "reason": unavailable[n], "describe": BACKENDS[n][0]}
                     for n in names},
        "results": results,
    }


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] == "ok":
        text = f"{row['us']:.1f}" if row["us"] >= 10 else f"{row['us']:.3g}"
        return text + (" (e)" if row.get("timing") == "eager" and row.get("graph_error") else "")
    return {"unavailable": "n/a", "unsupported": "skip", "oom": "OOM"}.get(row["status"], "err")


def _common_key(a: dict, b: dict, prefer: str = "graph_us") -> str:
    """The timing both rows have: graph-replayed device time when both were captured, else eager."""
    return prefer if a.get(prefer) and b.get(prefer) else "eager_us"


def _ratio(num: dict | None, den: dict | None, key: str | None = None) -> str:
    """``num`` time / ``den`` time on the same timing method (> 1: ``den`` is faster)."""
    ok = num and den and num.get("status") == "ok" and den.get("status") == "ok"
    if not ok:
        return "-"
    key = key or _common_key(num, den)
    return f"{num[key] / den[key]:.2f}x" if num.get(key) and den.get(key) else "-"


def tables(report: dict, markdown: bool = False) -> str:
    """One table per op: microseconds per call for every backend, the read-once floor, pagoda's
    speed-up over each peer (peer time / pagoda time) and pagoda's time in multiples of the floor."""
    names = [n for n, b in report["backends"].items() if b["available"]]
    by_op: dict[str, dict[tuple, dict[str, dict]]] = {}
    for r in report["results"]:
        by_op.setdefault(r["op"], {}).setdefault((r["vocab"], r["batch"]), {})[r["backend"]] = r
    peers = [p for p in ("torch_sort", "flashinfer") if p in names] if "pagoda" in names else []
    out = []
    for op in [o for o in OPS if o in by_op]:
        eager_peers = [p for p in peers if p == "flashinfer"]
        headers = (["vocab", "batch"] + [f"{n} us" for n in names] + ["floor us", "floor GB/s"]
                   + [f"vs {p}" for p in peers] + [f"vs {p} (eager)" for p in eager_peers]
                   + (["pagoda x floor", "pagoda GB/s"] if "pagoda" in names else []))
        rows = []
        for key in sorted(by_op[op]):
            cells = by_op[op][key]
            any_row = next(iter(cells.values()))
            row = [key[0], key[1]] + [_cell(cells.get(n)) for n in names] + [any_row["floor_us"], any_row["floor_gbps"]]
            pg = cells.get("pagoda")
            row += [_ratio(cells.get(p), pg) for p in peers]
            row += [_ratio(cells.get(p), pg, "eager_us") for p in eager_peers]
            if "pagoda" in names:
                ok = pg is not None and pg["status"] == "ok"
                floor = (pg.get("floor_graph_us") if pg.get("graph_us") else pg.get("floor_eager_us")) if ok else None
                row += [f"{pg['us'] / floor:.2f}x" if floor else "-", pg["gbps"] if ok else "-"]
            rows.append(row)
        how = "CUDA-graph replay" if any(r.get("timing") == "graph" for c in by_op[op].values() for r in c.values()) \
            else "eager calls"
        title = f"{op} sampling, us per call ({report['meta']['dtype']} probabilities, {how})"
        if markdown:
            out.append(f"### {title}\n\n" + _report.markdown_table(headers, rows))
        else:
            out.append(title + "\n" + _report.format_table(headers, rows, align_left=0))
    out += _report.backend_notes(report, markdown)
    uncaptured = sorted({f"{r['backend']} {r['op']}: {r['graph_error']}" for r in report["results"]
                         if r.get("graph_error")})
    if uncaptured:
        out.append("Not captured in a CUDA graph (eager figures, marked (e)):\n"
                   + "\n".join(("- " if markdown else "  ") + e for e in uncaptured))
    skips = sorted({f"{r['backend']} {r['op']}: {r['reason']}" for r in report["results"]
                    if r["status"] in ("error", "unsupported", "oom")})
    if skips:
        out.append("Skipped or failed:\n" + "\n".join(("- " if markdown else "  ") + e for e in skips))
    return "\n\n".join(out)

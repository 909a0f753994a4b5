"""The cascade study: decode over a long shared prefix, cascade vs plain paged decode, beside FlashInfer.

Requests share a ``prefix`` of tokens (full pages) and own ``unique`` tokens each; one query token
per request (decode), GQA 32/8, head_dim 128, page size 16, pages in random order. Backends:
pagoda's `MultiLevelCascadeAttentionWrapper` (2 levels) and `BatchDecodeWithPagedKVCacheWrapper`
over the concatenated pages, FlashInfer's two when importable. The GPU grid sweeps prefix x batch to
find the crossover below which cascade does not pay. The floor: the shared level's FLOPs at the
rate of a dense prefill kernel (``PREFILL_FLOPS``) plus the unique KV bytes at the measured
copy bandwidth (H200 figures; other GPUs: indicative only).
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass

import torch

from pagoda.bench import report as _report
from pagoda.bench.attention import _classify
from pagoda.bench.backends import flashinfer_missing
from pagoda.bench.progress import Progress
from pagoda.bench.timing import time_ms

PREFILL_FLOPS = 505e12    # the floor's prefill rate: pagoda's Triton prefill kernel at d128 16k on an H200
COPY_BYTES_PER_S = 4.25e12
BACKENDS = ("pagoda_cascade", "pagoda_decode", "flashinfer_cascade", "flashinfer_decode")


@dataclass(slots=True, frozen=True)
class CascadeCase:
    prefix: int            # shared tokens (a multiple of page_size)
    unique: int            # tokens each request owns
    batch: int
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16

    def __post_init__(self):
        if self.prefix % self.page_size or self.unique < 1 or self.batch < 1:
            raise ValueError(f"prefix must be a multiple of page_size and unique, batch >= 1: {self}")

    def label(self) -> str:
        return f"prefix={self.prefix} unique={self.unique} b={self.batch}"


def cascade_grid(name: str) -> list[CascadeCase]:
    if name == "full":
        cases = [CascadeCase(32768, 256, 128)]
        cases += [CascadeCase(p, 256, b) for p in (1024, 4096, 32768) for b in (1, 8, 32, 128)
                  if (p, b) != (32768, 128)]
        return cases
    if name == "small":
        return [CascadeCase(p, 16, b, 4, 2, 32, 16) for p, b in ((64, 2), (128, 4))]
    raise ValueError(f"grid must be 'full' or 'small', got {name!r}")


def _layout(case: CascadeCase, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = case.page_size
    n_prefix, n_unique = case.prefix // ps, -(-case.unique // ps)
    total = n_prefix + case.batch * n_unique
    perm = torch.randperm(total, generator=g).tolist()
    prefix_pages = perm[:n_prefix]
    page_lists = [prefix_pages + perm[n_prefix + r * n_unique: n_prefix + (r + 1) * n_unique]
                  for r in range(case.batch)]
    last = (case.unique - 1) % ps + 1
    cache = torch.randn(total, 2, ps, case.num_kv_heads, case.head_dim, generator=g).to(dtype).to(device)
    q = torch.randn(case.batch, case.num_qo_heads, case.head_dim, generator=g).to(dtype).to(device)
    return cache, q, page_lists, [last] * case.batch


def _csr(page_lists, last, device):
    indptr = torch.tensor([0] + torch.tensor([len(p) for p in page_lists]).cumsum(0).tolist(), dtype=torch.int32)
    indices = torch.tensor([p for lst in page_lists for p in lst], dtype=torch.int32)
    return indptr.to(device), indices.to(device), torch.tensor(last, dtype=torch.int32, device=device)


def _prepare(name, case, cache, q, page_lists, last, workspace):
    from pagoda.ops.cascade_levels import build_cascade_levels

    c = case
    common = (c.num_qo_heads, c.num_kv_heads, c.head_dim, c.page_size)
    if name.endswith("_cascade"):
        if name == "pagoda_cascade":
            from pagoda.ops.cascade import MultiLevelCascadeAttentionWrapper as W
        else:
            from flashinfer import MultiLevelCascadeAttentionWrapper as W
        levels = build_cascade_levels(page_lists, last, [1] * c.batch, c.page_size, device=q.device)
        w = W(2, workspace, "NHD")
        w.plan(*levels.as_plan_args(), *common, causal=True, q_data_type=q.dtype, kv_data_type=cache.dtype)
        return lambda: w.run(q, cache)
    if name == "pagoda_decode":
        from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper as W
    else:
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper as W
    w = W(workspace, "NHD")
    w.plan(*_csr(page_lists, last, q.device), *common, q_data_type=q.dtype, kv_data_type=cache.dtype)
    return lambda: w.run(q, cache)


def _unavailable(name, device):
    return flashinfer_missing(device) if name.startswith("flashinfer") else None


def floor_ms(case: CascadeCase) -> float:
    """Shared level's FLOPs at the dense prefill rate + unique KV bytes (bf16) at the copy bandwidth, in ms."""
    flops = 4.0 * case.batch * case.num_qo_heads * case.prefix * case.head_dim
    unique_bytes = 2 * case.batch * case.unique * case.num_kv_heads * case.head_dim * 2
    return (flops / PREFILL_FLOPS + unique_bytes / COPY_BYTES_PER_S) * 1e3


def run_study(grid: str, backends, device: torch.device, dtype: torch.dtype) -> dict:
    names = backends or list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; known: {list(BACKENDS)}")
    unavailable = {n: _unavailable(n, device) for n in names}
    cases = cascade_grid(grid)
    workspace = torch.empty(256 * 2**20 if device.type == "cuda" else 1024, dtype=torch.uint8, device=device)
    results = []
    with Progress(len(cases), "cascade") as bar:
        for case in cases:
            cache, q, page_lists, last = _layout(case, device, dtype)
            for name in names:
                row = {**asdict(case), "backend": name, "dtype": str(dtype).replace("torch.", ""), "status": "ok",
                       "reason": None, "ms": None,
                       "floor_ms": round(floor_ms(case), 5) if device.type == "cuda" else None}
                if unavailable[name]:
                    row.update(status="unavailable", reason=unavailable[name])
                else:
                    try:
                        fn = _prepare(name, case, cache, q, page_lists, last, workspace)
                        fn()
                        row["ms"] = round(time_ms(fn, device), 5)
                    except Exception as exc:
                        row["status"], row["reason"] = _classify(exc)
                results.append(row)
            del cache, q
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bar.step(case.label())
    return {"study": "cascade",
            "meta": {**_report.environment(device), "grid": grid, "dtype": str(dtype).replace("torch.", "")},
            "backends": {n: {"available": unavailable[n] is None, "reason": unavailable[n]} for n in names},
            "results": results}


def tables(report: dict, markdown: bool = False) -> str:
    names = [n for n, b in report["backends"].items() if b["available"]]
    by_case: dict[tuple, dict] = {}
    for r in report["results"]:
        by_case.setdefault((r["prefix"], r["unique"], r["batch"]), {})[r["backend"]] = r

    def ms(row):
        return row["ms"] if row and row["status"] == "ok" else None

    headers = ["prefix", "unique", "batch"] + [f"{n} ms" for n in names] + [
        "cascade speed-up vs pagoda decode", "pagoda/flashinfer cascade", "floor ms", "x floor"]
    rows = []
    for key in sorted(by_case):
        cells = by_case[key]
        pc, pd, fc = (ms(cells.get(n)) for n in ("pagoda_cascade", "pagoda_decode", "flashinfer_cascade"))
        floor = next(iter(cells.values()))["floor_ms"]
        rows.append(list(key) + [(f"{ms(cells[n]):.4f}" if ms(cells.get(n)) else cells[n]["status"]) for n in names]
                    + [f"{pd / pc:.2f}x" if pc and pd else "-", f"{fc / pc:.2f}x" if pc and fc else "-",
                       f"{floor:.4f}" if floor else "-", f"{pc / floor:.2f}" if pc and floor else "-"])
    table = _report.markdown_table(headers, rows) if markdown else _report.format_table(headers, rows, 0)
    reasons = [f"{n}: {b['reason']}" for n, b in report["backends"].items() if not b["available"]]
    errors = sorted({f"{r['backend']}: {r['reason']}" for r in report["results"]
                     if r["status"] not in ("ok", "unavailable")})
    out = [("### Cascade decode (ms)\n\n" if markdown else "Cascade decode (ms)\n") + table]
    for title, items in (("Unavailable", reasons), ("Failures", errors)):
        if items:
            out.append(f"{title}:\n" + "\n".join(("- " if markdown else "  ") + i for i in items))
    return "\n\n".join(out)

"""The ``mask`` study: paged prefill with a custom mask against the unmasked kernel on the same shape.

bf16, GQA 32/8, head_dim 128, page 16, pages in random order, every request ``seqlen`` queries against its
``seqlen`` keys (non-causal). Rows of one case, each through `BatchPrefillWithPagedKVCacheWrapper`:

* ``unmasked``: no mask, pagoda's default dispatch (the warp-specialised Gluon kernel on sm_90 where it applies);
* ``unmasked_triton``: no mask, the Triton paged kernel at the launch configuration the masked call uses
  (``PAGODA_HOPPER_ATTN=0 PAGODA_AUTOTUNE=0`` for that call): the same kernel without the mask, the reference
  of the ``*_triton`` rows;
* ``random``: a random mask (each score visible with probability 1/2), planned with ``PAGODA_MASKED_GLUON=1`` (on
  sm_90 the Gluon kernel, `pagoda.kernels.hopper.paged`, for these shapes): every tile is read, so this measures
  the cost of the bits themselves (target: at most 1.15x the unmasked call);
* ``half_tiles``: random bits in half of the (128 queries x 128 keys) blocks, a checkerboard, nothing in the
  others, so half of either kernel's tiles are empty and skipped (target: at most 0.6x the unmasked call);
* ``random_triton`` / ``half_tiles_triton``: the same masks planned and run on the Triton paged kernel
  (``PAGODA_HOPPER_ATTN=0 PAGODA_AUTOTUNE=0``), to be read against ``unmasked_triton``.

Figures: median ms, TFLOP/s of the dense-equivalent work (``4 * b * s^2 * h * d``), each masked row's ratio to
``unmasked_triton`` and to ``unmasked``, the fraction of tile pairs the kernel visits, and the plan time of the
mask. The prediction from bytes and instructions is in docs/masks.md. The CPU grid is tiny and runs the
reference path (a smoke test of the study, no kernel figures).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from pagoda.bench import report as _report
from pagoda.bench.attention import _classify
from pagoda.bench.progress import Progress
from pagoda.bench.timing import time_stats

VARIANTS = ("unmasked", "unmasked_triton", "random", "half_tiles", "random_triton", "half_tiles_triton")
PAGE_SIZE = 16


@dataclass(slots=True, frozen=True)
class MaskCase:
    batch: int
    seqlen: int
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128

    def label(self) -> str:
        return f"b={self.batch} s={self.seqlen}"


def grid_cases(name: str) -> list[MaskCase]:
    if name == "full":
        return [MaskCase(1, 8192), MaskCase(4, 4096), MaskCase(16, 1024)]
    if name == "small":
        return [MaskCase(1, 40, 4, 2, 32), MaskCase(2, 24, 4, 2, 32)]
    raise ValueError(f"grid must be 'full' or 'small', got {name!r}")


@contextlib.contextmanager
def _env(**values):
    """Set environment switches for the duration (pagoda reads them per call)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def half_tile_mask(seqlen: int, group: int, head_dim: int, fp32: bool, g: torch.Generator) -> torch.Tensor:
    """Bool ``[seqlen, seqlen]``: random bits in a checkerboard of blocks that are whole tiles of both masked
    kernels (the Triton kernel's `_mask.tile_shape`, the Gluon kernel's `_mask.GLUON_TILE`)."""
    from pagoda.ops import _mask

    cfg = _mask.tile_shape(seqlen * group, head_dim, fp32)
    bq = math.lcm(max(cfg["BLOCK_M"] // group, 1), _mask.GLUON_TILE[0])
    bk = math.lcm(cfg["BLOCK_N"], _mask.GLUON_TILE[1])
    i, j = torch.arange(seqlen)[:, None] // bq, torch.arange(seqlen)[None, :] // bk
    return ((i + j) % 2 == 0) & (torch.rand(seqlen, seqlen, generator=g) < 0.5)


def _setup(case: MaskCase, device, dtype, g):
    per = -(-case.seqlen // PAGE_SIZE)
    pages = case.batch * per
    cache = torch.randn(pages, 2, PAGE_SIZE, case.num_kv_heads, case.head_dim, generator=g).to(dtype).to(device)
    indices = torch.randperm(pages, generator=g).to(torch.int32).to(device)
    indptr = (torch.arange(case.batch + 1, dtype=torch.int32) * per).to(device)
    last = torch.full((case.batch,), case.seqlen - (per - 1) * PAGE_SIZE, dtype=torch.int32).to(device)
    qo_indptr = (torch.arange(case.batch + 1, dtype=torch.int32) * case.seqlen).to(device)
    q = torch.randn(case.batch * case.seqlen, case.num_qo_heads, case.head_dim, generator=g).to(dtype).to(device)
    return q, cache, (qo_indptr, indptr, indices, last)


def _fn(variant: str, case: MaskCase, q, cache, meta, workspace, g):
    """(the timed call, plan ms, visited tile fraction) of one variant."""
    from pagoda.ops.prefill import BatchPrefillWithPagedKVCacheWrapper

    hq, hk, d = case.num_qo_heads, case.num_kv_heads, case.head_dim
    mask = None
    triton_only = variant.endswith("_triton")
    if variant.startswith("random"):
        mask = torch.rand(case.batch * case.seqlen * case.seqlen, generator=g) < 0.5
    elif variant.startswith("half_tiles"):
        mask = torch.cat([half_tile_mask(case.seqlen, hq // hk, d, q.dtype == torch.float32, g).reshape(-1)
                          for _ in range(case.batch)])
    w = BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    kw = {} if mask is None else {"custom_mask": mask.to(q.device)}
    if q.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    switches = dict(PAGODA_HOPPER_ATTN="0", PAGODA_AUTOTUNE="0") if triton_only else dict(PAGODA_MASKED_GLUON="1")
    with _env(**switches):
        w.plan(*meta, hq, hk, d, PAGE_SIZE, q_data_type=q.dtype, kv_data_type=cache.dtype, **kw)
    if q.is_cuda:
        torch.cuda.synchronize()
    plan_ms = (time.perf_counter() - t0) * 1e3
    visited = w._mask.visited if w._mask is not None else None
    if triton_only:
        def run():
            with _env(PAGODA_HOPPER_ATTN="0", PAGODA_AUTOTUNE="0"):
                return w.run(q, cache)
        return run, plan_ms, visited
    return (lambda: w.run(q, cache)), plan_ms, visited


def run_study(grid: str, backends, device: torch.device, dtype: torch.dtype) -> dict:
    names = backends or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    cases = grid_cases(grid)
    workspace = torch.empty(256 * 2**20 if device.type == "cuda" else 1 << 16, dtype=torch.uint8, device=device)
    results = []
    with Progress(len(cases), "mask") as bar:
        for case in cases:
            g = torch.Generator().manual_seed(0)
            q, cache, meta = _setup(case, device, dtype, g)
            flops = 4 * case.batch * case.seqlen ** 2 * case.num_qo_heads * case.head_dim
            rows, fns = [], {}
            for name in names:
                row = {**asdict(case), "backend": name, "dtype": str(dtype).replace("torch.", ""), "status": "ok",
                       "reason": None, "ms": None}
                rows.append(row)
                try:
                    fn, row["plan_ms"], row["visited"] = _fn(name, case, q, cache, meta, workspace, g)
                    fn()
                    fns[name] = fn
                except Exception as exc:
                    row["status"], row["reason"] = _classify(exc)
            for _ in range(2):   # two rounds, in turn; each keeps its best median
                for row in rows:
                    if row["backend"] not in fns:
                        continue
                    try:
                        ms, sp = time_stats(fns[row["backend"]], device)
                    except Exception as exc:
                        row["status"], row["reason"] = _classify(exc)
                        fns.pop(row["backend"])
                        continue
                    if row["ms"] is None or ms < row["ms"]:
                        row.update(ms=round(ms, 5), spread=round(sp, 3),
                                   tflops=_report.significant(flops / ms / 1e9))
            by = {r["backend"]: r["ms"] for r in rows if r["ms"]}
            for row in rows:
                for ref in ("unmasked_triton", "unmasked"):
                    if row["ms"] and by.get(ref):
                        row[f"vs_{ref}"] = round(row["ms"] / by[ref], 3)
            results.extend(rows)
            fns.clear()
            del q, cache
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bar.step(case.label())
    return {"study": "mask",
            "meta": {**_report.environment(device), "grid": grid, "dtype": str(dtype).replace("torch.", ""),
                     "metric": "ms (median), TFLOP/s of the dense-equivalent work 4*b*s^2*h*d",
                     "targets": {"random": 1.15, "half_tiles": 0.6}, "target_of": "unmasked"},
            "backends": {n: {"available": True, "reason": None} for n in names},
            "results": results}


def tables(report: dict, markdown: bool = False) -> str:
    headers = ["batch", "seqlen", "variant", "ms", "TFLOP/s", "visited", "plan ms", "/ unmasked_triton",
               "/ unmasked", "target"]
    targets = report["meta"].get("targets", {})
    rows = []
    for r in report["results"]:
        ok = r["status"] == "ok" and r["ms"]
        rows.append([r["batch"], r["seqlen"], r["backend"], r["ms"] if ok else r["status"], r.get("tflops"),
                     r.get("visited"), None if r.get("plan_ms") is None else round(r["plan_ms"], 2),
                     r.get("vs_unmasked_triton"), r.get("vs_unmasked"),
                     f"<= {targets[r['backend']]}" if r["backend"] in targets else None])
    title = f"mask: paged prefill with a custom mask ({report['meta']['metric']})"
    table = _report.markdown_table(headers, rows) if markdown else _report.format_table(headers, rows, 3)
    errors = sorted({f"{r['backend']} {r['batch']}x{r['seqlen']}: {r['reason']}" for r in report["results"]
                     if r["status"] != "ok"})
    out = (f"### {title}\n\n" if markdown else f"{title}\n") + table
    if errors:
        out += "\n\nFailures:\n" + "\n".join(("- " if markdown else "  ") + e for e in errors)
    return out

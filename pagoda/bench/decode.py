"""The decode and paged-prefill studies, on one shared paged-KV setup.

``decode``: bf16, GQA 32/8, head_dim 128, pages in random order; pagoda's
`BatchDecodeWithPagedKVCacheWrapper` at page size 16 and 1, FlashInfer's wrapper with tensor cores off
and on (when importable), and SDPA (cuDNN, and default dispatch) on the same KV laid out contiguously.
Figure: TB/s of KV read once (2 · batch · ctx · kv_heads · head_dim · 2 bytes / time). On CUDA a second table
gives the same figure from device time: each call captured once in a CUDA graph and replayed
(`timing.graph_time_ms`), as a serving engine runs decode. At batch 1 a call's host time (~45 µs on the H200
machine) exceeds its device time (~20 µs at 4k), and the first table then reads partly host time.
``paged``: causal prefill through pagoda's `BatchPrefillWithPagedKVCacheWrapper` (page 16) vs pagoda's
dense kernels on the same data (``pagoda_dense``: `flash_attn_varlen_func`; ``pagoda_dense4d``: the equal-length
batch as 4-D `flash_attn_func`, the Gluon kernel on sm_90; "paged / best dense" divides by the faster) and
FlashInfer's paged prefill. Figure: TFLOP/s (causal halves).
The CPU grids are tiny and run the reference paths.
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass

import torch

from pagoda.bench import report as _report
from pagoda.bench.attention import _classify
from pagoda.bench.backends import flashinfer_missing
from pagoda.bench.progress import Progress
from pagoda.bench.timing import graph_time_ms, time_ms

PASSES = 2          # timing rounds per case (best median kept, see _run)
DECODE_BACKENDS = ("pagoda", "pagoda_p1", "flashinfer", "flashinfer_tc", "sdpa_cudnn", "sdpa")
PAGED_BACKENDS = ("pagoda_paged", "pagoda_dense", "pagoda_dense4d", "flashinfer_paged")


@dataclass(slots=True, frozen=True)
class KVCase:
    batch: int
    ctx: int                     # keys per request (decode) / tokens per request (prefill)
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128

    def __post_init__(self):
        if min(self.batch, self.ctx, self.num_qo_heads, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError(f"KVCase sizes must be positive, got {self}")

    def label(self) -> str:
        return f"b={self.batch} ctx={self.ctx}"


def decode_grid(name: str) -> list[KVCase]:
    if name == "full":
        return [KVCase(b, c) for b, c in ((16, 4096), (64, 4096), (256, 4096), (1, 4096), (1, 32768), (1, 131072))]
    if name == "small":
        return [KVCase(b, c, 4, 2, 32) for b, c in ((2, 64), (4, 200))]
    raise ValueError(f"grid must be 'full' or 'small', got {name!r}")


def paged_grid(name: str) -> list[KVCase]:
    if name == "full":
        return [KVCase(b, s) for b, s in ((8, 1024), (2, 4096), (1, 16384))]
    if name == "small":
        return [KVCase(b, s, 4, 2, 32) for b, s in ((2, 48), (1, 100))]
    raise ValueError(f"grid must be 'full' or 'small', got {name!r}")


def _paged_kv(case: KVCase, page_size: int, device, dtype, g):
    """Pages in random order; returns (cache NHD, kv_indptr, kv_indices, kv_last_page_len, k, v contiguous)."""
    per = -(-case.ctx // page_size)
    pages = case.batch * per
    perm = torch.randperm(pages, generator=g).to(torch.int32)
    cache = torch.randn(pages, 2, page_size, case.num_kv_heads, case.head_dim, generator=g).to(dtype)
    indptr = torch.arange(case.batch + 1, dtype=torch.int32) * per
    last = torch.full((case.batch,), case.ctx - (per - 1) * page_size, dtype=torch.int32)
    # The same keys/values request-major and contiguous: [batch, ctx, kv_heads, head_dim].
    k = cache[perm.long(), 0].reshape(case.batch, per * page_size, case.num_kv_heads, case.head_dim)[:, :case.ctx]
    v = cache[perm.long(), 1].reshape(case.batch, per * page_size, case.num_kv_heads, case.head_dim)[:, :case.ctx]
    return (cache.to(device), indptr.to(device), perm.to(device), last.to(device), k.contiguous().to(device),
            v.contiguous().to(device))


def _unavailable(name: str, device) -> str | None:
    if name.startswith("flashinfer"):
        return flashinfer_missing(device)
    if name == "sdpa_cudnn" and device.type != "cuda":
        return "needs a CUDA device"
    return None


def _decode_fn(name, case, q, kv16, kv1, workspace):
    hq, hk, d = case.num_qo_heads, case.num_kv_heads, case.head_dim
    if name in ("pagoda", "pagoda_p1", "flashinfer", "flashinfer_tc"):
        ps, (cache, indptr, indices, last, _, _) = (1, kv1) if name == "pagoda_p1" else (16, kv16)
        if name.startswith("pagoda"):
            from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper
            w = BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        else:
            import flashinfer
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=name.endswith("tc"))
        w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=q.dtype, kv_data_type=cache.dtype)
        return lambda: w.run(q, cache)
    from torch.nn import functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    k, v = (t.transpose(1, 2).contiguous() for t in kv16[4:])          # [b, hk, ctx, d]
    qs = q[:, :, None]                                                    # [b, hq, 1, d]
    if name == "sdpa_cudnn":
        def run():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)
        return run
    return lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)


def _paged_fn(name, case, q, kv, workspace, page_size=16):
    """The call timed for backend ``name``; ``kv`` = `_paged_kv` at ``page_size`` (16 in the study)."""
    hq, hk, d = case.num_qo_heads, case.num_kv_heads, case.head_dim
    cache, indptr, indices, last, k, v = kv
    cu = torch.arange(case.batch + 1, dtype=torch.int32, device=q.device) * case.ctx
    if name == "pagoda_dense":
        import pagoda
        kf, vf = k.reshape(-1, hk, d), v.reshape(-1, hk, d)
        return lambda: pagoda.flash_attn_varlen_func(q, kf, vf, cu, cu, case.ctx, case.ctx, causal=True)
    if name == "pagoda_dense4d":  # equal lengths as a 4-D batch: flash_attn_func (the Gluon kernel on sm_90)
        import pagoda
        b, s = case.batch, case.ctx
        q4, k4, v4 = q.view(b, s, hq, d), k.reshape(b, s, hk, d), v.reshape(b, s, hk, d)
        return lambda: pagoda.flash_attn_func(q4, k4, v4, causal=True)
    if name == "pagoda_paged":
        from pagoda.ops.prefill import BatchPrefillWithPagedKVCacheWrapper
        w = BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    else:
        import flashinfer
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    w.plan(cu, indptr, indices, last, hq, hk, d, page_size, causal=True, q_data_type=q.dtype,
           kv_data_type=cache.dtype)
    return lambda: w.run(q, cache)


def _run(study: str, grid: str, backends, device: torch.device, dtype: torch.dtype) -> dict:
    known = DECODE_BACKENDS if study == "decode" else PAGED_BACKENDS
    names = backends or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; known: {list(known)}")
    unavailable = {n: _unavailable(n, device) for n in names}
    cases = decode_grid(grid) if study == "decode" else paged_grid(grid)
    workspace = torch.empty(256 * 2**20 if device.type == "cuda" else 1 << 16, dtype=torch.uint8, device=device)
    results = []
    with Progress(len(cases), study) as bar:
        for case in cases:
            g = torch.Generator().manual_seed(0)
            kv16 = _paged_kv(case, 16, device, dtype, g)
            kv1 = _paged_kv(case, 1, device, dtype, g) if study == "decode" and "pagoda_p1" in names else None
            nq = case.batch if study == "decode" else case.batch * case.ctx
            q = torch.randn(nq, case.num_qo_heads, case.head_dim, generator=g).to(dtype).to(device)
            kv_bytes = 2 * case.batch * case.ctx * case.num_kv_heads * case.head_dim * torch.finfo(dtype).bits // 8
            flops = 4 * case.batch * case.ctx * case.ctx * case.num_qo_heads * case.head_dim / 2
            rows, fns = [], {}
            for name in names:
                row = {**asdict(case), "backend": name, "dtype": str(dtype).replace("torch.", ""), "status": "ok",
                       "reason": None, "ms": None}
                rows.append(row)
                if unavailable[name]:
                    row.update(status="unavailable", reason=unavailable[name])
                    continue
                try:
                    fns[name] = (_decode_fn(name, case, q, kv16, kv1, workspace) if study == "decode"
                                 else _paged_fn(name, case, q, kv16, workspace))
                    fns[name]()
                except Exception as exc:
                    row["status"], row["reason"] = _classify(exc)
            # Every backend is timed in PASSES rounds, in turn, and keeps its best median: a call whose host
            # time is close to its device time (batch 1) read up to 2x slower when timed first after the
            # case's inputs were built (on an H200, b1 4k page 16 read 0.36 TB/s in one round and 0.86 in
            # another), which one more round in another position removes.
            for _ in range(PASSES):
                for row in rows:
                    if row["backend"] not in fns or row["status"] != "ok":
                        continue
                    try:
                        ms = time_ms(fns[row["backend"]], device)
                    except Exception as exc:
                        row["status"], row["reason"] = _classify(exc)
                        continue
                    if row["ms"] is None or ms < row["ms"]:
                        row["ms"] = round(ms, 5)
                        if study == "decode":
                            row["tb_per_s"] = _report.significant(kv_bytes / ms / 1e9)
                        else:
                            row["tflops"] = _report.significant(flops / ms / 1e9)
            if study == "decode" and device.type == "cuda":
                _graph_round(rows, fns, device, kv_bytes)
            results.extend(rows)
            fns.clear()
            del kv16, kv1, q
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bar.step(case.label())
    metric = ("TB/s of KV read once" if study == "decode" else "TFLOP/s, causal (4*b*s^2*h*d/2)")
    return {"study": study,
            "meta": {**_report.environment(device), "grid": grid, "dtype": str(dtype).replace("torch.", ""),
                     "metric": metric},
            "backends": {n: {"available": unavailable[n] is None, "reason": unavailable[n]} for n in names},
            "results": results}


def _graph_round(rows: list, fns: dict, device: torch.device, kv_bytes: int) -> None:
    """Device time of every timed decode call, replayed from a CUDA graph: ``graph_ms`` / ``graph_tb_per_s``
    in its row, or ``graph_reason`` when the call cannot be captured (the row's status stays as timed)."""
    for row in rows:
        fn = fns.get(row["backend"])
        if fn is None or row["status"] != "ok":
            continue
        try:
            ms = graph_time_ms(fn, device)
        except Exception as exc:
            row["graph_reason"] = _classify(exc)[1]
            continue
        row["graph_ms"] = round(ms, 5)
        row["graph_tb_per_s"] = _report.significant(kv_bytes / ms / 1e9)


def run_decode(grid, backends, device, dtype) -> dict:
    return _run("decode", grid, backends, device, dtype)


def run_paged(grid, backends, device, dtype) -> dict:
    return _run("paged", grid, backends, device, dtype)


def tables(report: dict, markdown: bool = False) -> str:
    """The study's table; for decode on CUDA also the graph-replayed (device time) table."""
    out = [_table(report, "tb_per_s" if report["study"] == "decode" else "tflops", report["meta"]["metric"],
                  markdown)]
    if any(r.get("graph_tb_per_s") for r in report["results"]):
        out.append(_table(report, "graph_tb_per_s", report["meta"]["metric"] + ", device time (one call replayed "
                          "from a CUDA graph)", markdown))
    reasons = [f"{n}: {b['reason']}" for n, b in report["backends"].items() if not b["available"]]
    errors = sorted({f"{r['backend']}: {r['reason']}" for r in report["results"]
                     if r["status"] not in ("ok", "unavailable")})
    errors += sorted({f"{r['backend']} (CUDA graph): {r['graph_reason']}" for r in report["results"]
                      if r.get("graph_reason")})
    for t, items in (("Unavailable", reasons), ("Failures", errors)):
        if items:
            out.append(f"{t}:\n" + "\n".join(("- " if markdown else "  ") + i for i in items))
    return "\n\n".join(out)


def _table(report: dict, metric: str, title: str, markdown: bool) -> str:
    decode = report["study"] == "decode"
    names = [n for n, b in report["backends"].items() if b["available"]]
    by_case: dict[tuple, dict] = {}
    for r in report["results"]:
        by_case.setdefault((r["batch"], r["ctx"]), {})[r["backend"]] = r

    def val(c, n):
        r = c.get(n)
        return r.get(metric) if r and r["status"] == "ok" else None

    def cell(c, n):  # the figure, else the row's status ("-": timed, but no figure of this kind, e.g. no graph)
        v = val(c, n)
        return f"{v:.3g}" if v else ("-" if c[n]["status"] == "ok" else c[n]["status"])

    extra = (["pagoda / best FlashInfer", "page 1 / page 16"] if decode
             else ["paged / best dense", "pagoda / FlashInfer"])
    rows = []
    for key in sorted(by_case, key=lambda k: (k[1], k[0])):
        c = by_case[key]
        row = list(key) + [cell(c, n) for n in names]
        if decode:
            fi = max([x for x in (val(c, "flashinfer"), val(c, "flashinfer_tc")) if x] or [0])
            p, p1 = val(c, "pagoda"), val(c, "pagoda_p1")
            row += [f"{p / fi:.2f}x" if p and fi else "-", f"{p1 / p:.2f}" if p and p1 else "-"]
        else:
            pp, fi = val(c, "pagoda_paged"), val(c, "flashinfer_paged")
            pd = max([x for x in (val(c, "pagoda_dense"), val(c, "pagoda_dense4d")) if x] or [0])
            row += [f"{pp / pd:.2f}" if pp and pd else "-", f"{pp / fi:.2f}x" if pp and fi else "-"]
        rows.append(row)
    headers = ["batch", "ctx" if decode else "seqlen"] + names + extra
    table = _report.markdown_table(headers, rows) if markdown else _report.format_table(headers, rows, 0)
    return (f"### {report['study']}: {title}\n\n" if markdown else f"{report['study']}: {title}\n") + table

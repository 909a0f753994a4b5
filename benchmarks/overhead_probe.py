"""Where does a call's time go? For each case: the `pagoda bench` figure (do_bench with L2 flush, host
launch included), the same call replayed from a CUDA graph (device time only), and the host time of one
call (Python + launches, no sync). A bench figure far above the graph figure means host overhead.

GPU only. Usage (repo root): PYTHONPATH=$PWD python3 benchmarks/overhead_probe.py [decode|decode_tiles|decode_sweep|decode_splits|cascade|sampling|all]
Optional env: PROBE_SPLITS="16,32,64" tries decode with fixed split sizes (pages per split).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton.testing


def host_us(fn, n=50):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def _graph_us(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median") * 1e3


def probe(name, fn, bytes_=None):
    bench = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    host = host_us(fn)
    try:
        graph = _graph_us(fn)
    except Exception as exc:  # noqa: BLE001 - report, go on
        graph = float("nan")
        print(f"  graph capture failed for {name}: {type(exc).__name__}: {exc}"[:300])
    row = dict(case=name, bench_us=round(bench, 1), graph_us=round(graph, 1), host_us=round(host, 1))
    if bytes_:
        row["graph_TBps"] = round(bytes_ / (graph * 1e-6) / 1e12, 3)
        row["bench_TBps"] = round(bytes_ / (bench * 1e-6) / 1e12, 3)
    print(json.dumps(row), flush=True)
    return row


def _decode_inputs(batch, ctx, hq, hk, d, ps):
    """bf16 q, an NHD paged cache with pages in random order and its CSR metadata, and the KV bytes."""
    per = ctx // ps
    pages = batch * per
    cache = torch.randn(pages, 2, ps, hk, d, device="cuda", dtype=torch.bfloat16)
    indices = torch.randperm(pages, device="cuda").to(torch.int32)
    indptr = (torch.arange(batch + 1, device="cuda") * per).to(torch.int32)
    last = torch.full((batch,), ps, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    return q, cache, indptr, indices, last, 2 * batch * ctx * hk * d * 2


def decode_cases():
    from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper

    rows = []
    hq, hk, d, ps = 32, 8, 128, 16
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    splits = [None] + [int(x) for x in os.environ.get("PROBE_SPLITS", "").split(",") if x]
    for batch, ctx in ((1, 4096), (1, 32768), (16, 4096), (64, 4096)):
        q, cache, indptr, indices, last, nbytes = _decode_inputs(batch, ctx, hq, hk, d, ps)
        for fs in splits:
            w = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
            kw = {} if fs is None else {"fixed_split_size": fs}
            try:
                w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16,
                       kv_data_type=torch.bfloat16, **kw)
            except TypeError as exc:
                print("plan:", exc)
                continue
            rows.append(probe(f"decode b{batch} ctx{ctx} split={fs} (splits={w._splits})",
                              lambda w=w: w.run(q, cache), nbytes))
        del cache
    return rows


def decode_tiles():
    """b1 page 16 vs page 1 (the 2026-12-01 bench: b1 4k 0.36 vs 0.83 TB/s): bench / graph / host time per page
    size with the whole-tile key loop forced on and off, so a gap is placed on the host or the device."""
    import pagoda.kernels.attention.decode as kd
    from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper

    rows = []
    hq, hk, d = 32, 8, 128
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    real = kd.whole_tiles
    for batch, ctx in ((1, 4096), (1, 32768), (64, 4096)):
        for ps in (16, 1):
            q, cache, indptr, indices, last, nbytes = _decode_inputs(batch, ctx, hq, hk, d, ps)
            for whole in ("auto", False, True):
                kd.whole_tiles = real if whole == "auto" else (lambda p, a, w=whole: w and bool(a & 1))
                w = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
                w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
                rows.append(probe(f"decode b{batch} ctx{ctx} page{ps} whole={whole} splits={w._splits}",
                                  lambda w=w: w.run(q, cache), nbytes))
            del cache
    kd.whole_tiles = real
    return rows


def decode_sweep():
    """Device time (graph replay) of the decode kernel per launch configuration and split heuristic."""
    import pagoda.kernels.attention.decode as kd
    import pagoda.ops._decode_plan as plan
    from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper

    rows = []
    hq, hk, d, ps = 32, 8, 128, 16
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    configs = [(64, 4, 3), (64, 4, 2), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4), (32, 2, 4), (128, 8, 4)]
    for batch, ctx in ((1, 32768), (16, 4096), (64, 4096), (256, 4096)):
        q, cache, indptr, indices, last, nbytes = _decode_inputs(batch, ctx, hq, hk, d, ps)
        for waves in (2, 4):
            plan.WAVES = waves
            w = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
            w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
            for bn, nw, st in configs:
                if waves == 4 and (bn, nw, st) != configs[0] and batch >= 64:
                    continue
                kd.CONFIG.update(block_n=bn, num_warps=nw, num_stages=st)
                try:
                    g = _graph_us(lambda: w.run(q, cache))
                except Exception as exc:  # noqa: BLE001
                    print(f"  {batch} {ctx} {bn} {nw} {st}: {type(exc).__name__}: {exc}"[:200])
                    continue
                row = dict(batch=batch, ctx=ctx, waves=waves, splits=w._splits, block_n=bn, warps=nw, stages=st,
                           graph_us=round(g, 1), TBps=round(nbytes / (g * 1e-6) / 1e12, 3))
                print(json.dumps(row), flush=True)
                rows.append(row)
        plan.WAVES = 2
        kd.CONFIG.update(block_n=None, num_warps=4, num_stages=3)
        del cache
    return rows


def _decode_kernel_occupancy():
    """(shared bytes, registers, spills) of the decode kernels compiled so far through the cached launch."""
    from pagoda.kernels.launch import fast as _launch
    from pagoda.kernels.attention.decode import _decode_kernel

    out = []
    for key, ck in _launch._compiled.items():
        if key[0] is _decode_kernel:
            md = ck.metadata
            out.append((getattr(md, "shared", None), getattr(ck, "n_regs", None), getattr(ck, "n_spills", None)))
    return sorted(set(out), key=str)


def decode_split_sweep():
    """Device time (graph replay) per (split count, block_n, stages): does the split count that fills the
    GPU in whole waves of resident programs win? Prints each compiled kernel's shared memory and registers
    (they set how many programs an SM holds at once)."""
    import pagoda.kernels.attention.decode as kd
    from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper

    rows = []
    hq, hk, d, ps = 32, 8, 128, 16
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    cases = {(16, 4096): (None, 256, 128, 86, 64, 43, 32), (64, 4096): (None, 128, 64),
             (256, 4096): (None, 128), (1, 32768): (None, 64, 32, 16)}
    configs = [(64, 4, 3), (64, 4, 2), (32, 4, 3), (64, 8, 3), (128, 8, 2)]
    if os.environ.get("PROBE_FUSED_ONLY") == "1":      # only the fused-merge comparison below
        cases = {}
    for (batch, ctx), splits in cases.items():
        q, cache, indptr, indices, last, nbytes = _decode_inputs(batch, ctx, hq, hk, d, ps)
        for fs in splits:
            w = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
            kw = {} if fs is None else ({"disable_split_kv": True} if fs * ps >= ctx else {"fixed_split_size": fs})
            w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
                   **kw)
            for bn, nw, st in configs:
                kd.CONFIG.update(block_n=bn, num_warps=nw, num_stages=st)
                try:
                    g = _graph_us(lambda: w.run(q, cache))
                except Exception as exc:  # noqa: BLE001
                    print(f"  {batch} {ctx} fs={fs} {bn} {nw} {st}: {type(exc).__name__}: {exc}"[:200], flush=True)
                    continue
                row = dict(batch=batch, ctx=ctx, fixed_split=fs, splits=w._splits, block_n=bn, warps=nw, stages=st,
                           graph_us=round(g, 1), TBps=round(nbytes / (g * 1e-6) / 1e12, 3))
                print(json.dumps(row), flush=True)
                rows.append(row)
        kd.CONFIG.update(block_n=None, num_warps=4, num_stages=3)
        del cache
    for batch, ctx in ((16, 4096), (1, 32768), (4, 8192)):         # merge in the decode kernel or a 2nd launch
        q, cache, indptr, indices, last, nbytes = _decode_inputs(batch, ctx, hq, hk, d, ps)
        w = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        for fused in (True, False):
            kd.FUSED_MERGE_ENABLED = fused
            g = _graph_us(lambda: w.run(q, cache))
            b = triton.testing.do_bench(lambda: w.run(q, cache), warmup=25, rep=100, return_mode="median") * 1e3
            row = dict(batch=batch, ctx=ctx, fused_merge=fused, splits=w._splits, graph_us=round(g, 1),
                       bench_us=round(b, 1), TBps=round(nbytes / (g * 1e-6) / 1e12, 3))
            print(json.dumps(row), flush=True)
            rows.append(row)
        kd.FUSED_MERGE_ENABLED = True
        del cache
    occ = _decode_kernel_occupancy()
    print("decode kernels (shared bytes, regs, spills):", occ, flush=True)
    rows.append({"occupancy": [list(o) for o in occ]})
    return rows


def cascade_rows():
    import pagoda.bench.cascade as cb

    rows = []
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for prefix, batch in ((32768, 128), (4096, 128), (32768, 32)):
        case = cb.CascadeCase(prefix, 256, batch)
        cache, q, page_lists, last = cb._layout(case, torch.device("cuda"), torch.bfloat16)
        for name in ("pagoda_cascade", "pagoda_decode"):
            fn = cb._prepare(name, case, cache, q, page_lists, last, ws)
            rows.append(probe(f"{name} prefix{prefix} b{batch}", fn))
        del cache
    return rows


def sampling_rows():
    import pagoda

    rows = []
    for vocab in (32000, 151936):
        for batch in (1, 32, 128, 512):
            probs = torch.softmax(torch.randn(batch, vocab, device="cuda") * 3, -1)
            kw = dict(seed=torch.tensor([1234], device="cuda"), offset=torch.tensor([0], device="cuda"))
            fns = {
                "sampling": lambda: pagoda.sampling_from_probs(probs, **kw),
                "top_p": lambda: pagoda.top_p_sampling_from_probs(probs, 0.9, **kw),
                "min_p": lambda: pagoda.min_p_sampling_from_probs(probs, 0.1, **kw),
                "top_k": lambda: pagoda.top_k_sampling_from_probs(probs, 50, **kw),
                "top_k_top_p": lambda: pagoda.top_k_top_p_sampling_from_probs(probs, 50, 0.9, **kw),
                "top_k_top_p_joint": lambda: pagoda.top_k_top_p_sampling_from_probs(probs, 50, 0.9,
                                                                                    filter_apply_order="joint", **kw),
            }
            for name, fn in fns.items():
                rows.append(probe(f"{name} v{vocab} b{batch}", fn, batch * vocab * 4))
    return rows


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    out = {}
    if which in ("decode", "all"):
        out["decode"] = decode_cases()
    if which == "decode_tiles":
        out["decode_tiles"] = decode_tiles()
    if which == "decode_sweep":
        out["decode_sweep"] = decode_sweep()
    if which == "decode_splits":
        out["decode_splits"] = decode_split_sweep()
    if which in ("cascade", "all"):
        out["cascade"] = cascade_rows()
    if which in ("sampling", "all"):
        out["sampling"] = sampling_rows()
    dest = os.environ.get("OUT")
    if dest:
        with open(os.path.join(dest, f"probe-{which}.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

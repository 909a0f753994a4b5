"""Paged Gluon prefill vs the dense kernels on the `pagoda bench paged` shapes: device time (CUDA-graph replay
of the call, L2 not flushed), do_bench time (as the bench, L2 flushed) and host time per call (no sync),
for the paged wrapper and the 4-D dense call (flash_attn_func, the Gluon kernel on sm_90). Prints JSON
lines. Questions: is paged b8 s1024's gap to the dense Gluon kernel device or host time; does it shrink with
fewer, larger TMA boxes per tile (page 64, 128: 2 boxes or 1 per 128-key tile instead of 8)?

``--epilogue`` (session 10): the paged kernel's per-CTA epilogue at page 16: O by masked stores (as before)
or by one TMA box per full 64-row warpgroup tile, LSE written or not (the wrapper skips it unless asked),
and pages in random against sequential order; the 4-D dense call beside. The dense kernel stores O by TMA
and writes no LSE, and the b8 s1024 gap (0.66x) looked per CTA, not per tile.

    PYTHONPATH=$PWD python3 benchmarks/paged_probe.py [--epilogue]
"""
import functools
import json
import os
import sys

import torch
import triton.testing

import pagoda
from pagoda.bench.decode import KVCase, _paged_fn, _paged_kv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead_probe import host_us  # noqa: E402


def _graph_ms(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def epilogue():
    import pagoda.kernels.attention.prefill_paged as PP
    hopper = PP.prefill_paged_hopper
    g = torch.Generator().manual_seed(0)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for b, s in ((8, 1024), (2, 4096), (1, 16384)):
        case = KVCase(b, s)
        kv = _paged_kv(case, 16, "cuda", torch.bfloat16, g)
        seq = (*kv[:2], torch.arange(kv[2].numel(), dtype=torch.int32, device="cuda"), *kv[3:])
        q = torch.randn(b * s, case.num_qo_heads, case.head_dim, generator=g).to("cuda", torch.bfloat16)
        flops = 4 * b * s * s * case.num_qo_heads * case.head_dim / 2
        row = {"b": b, "s": s}
        for label, o_tma, lse, pages in (("masked+lse", False, True, kv), ("tma+lse", True, True, kv),
                                         ("masked", False, False, kv), ("tma", True, False, kv),
                                         ("tma/seq", True, False, seq), ("dense4d", None, None, kv)):
            if o_tma is None:
                fn = _paged_fn("pagoda_dense4d", case, q, pages, ws)
            else:
                PP.prefill_paged_hopper = functools.partial(hopper, o_tma=o_tma)
                fn = _with_lse(case, q, pages, ws) if lse else _paged_fn("pagoda_paged", case, q, pages, ws)
            fn()
            row[label] = round(flops / triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e9, 1)
            row[label + "/graph"] = round(flops / _graph_ms(fn) / 1e9, 1)
        PP.prefill_paged_hopper = hopper
        print(json.dumps(row), flush=True)


def _with_lse(case, q, kv, ws):
    from pagoda.ops.prefill import BatchPrefillWithPagedKVCacheWrapper
    cache, indptr, indices, last = kv[:4]
    cu = torch.arange(case.batch + 1, dtype=torch.int32, device=q.device) * case.ctx
    w = BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(cu, indptr, indices, last, case.num_qo_heads, case.num_kv_heads, case.head_dim, 16, causal=True,
           q_data_type=q.dtype, kv_data_type=cache.dtype)
    return lambda: w.run(q, cache, return_lse=True)


def main():
    if "--epilogue" in sys.argv:
        return epilogue()
    g = torch.Generator().manual_seed(0)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for b, s in ((8, 1024), (2, 4096), (1, 16384)):
        case = KVCase(b, s)
        kv16 = _paged_kv(case, 16, "cuda", torch.bfloat16, g)
        q = torch.randn(b * s, case.num_qo_heads, case.head_dim, generator=g).to("cuda", torch.bfloat16)
        flops = 4 * b * s * s * case.num_qo_heads * case.head_dim / 2
        for name, ps in (("pagoda_paged", 16), ("pagoda_paged", 64), ("pagoda_paged", 128), ("pagoda_dense4d", 16),
                         ("pagoda_dense", 16)):
            kv = kv16 if ps == 16 else _paged_kv(case, ps, "cuda", torch.bfloat16, g)
            fn = _paged_fn(name, case, q, kv, ws, page_size=ps)
            row = {"b": b, "s": s, "backend": name, "page_size": ps}
            try:
                bench = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                dev = _graph_ms(fn)
                row.update(bench_TFs=round(flops / bench / 1e9, 1), graph_TFs=round(flops / dev / 1e9, 1),
                           host_us=round(host_us(fn), 1), graph_ms=round(dev, 4), bench_ms=round(bench, 4))
            except Exception as e:  # noqa: BLE001 - a probe: report and go on
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            print(json.dumps(row), flush=True)
    print(json.dumps({"torch": torch.__version__, "pagoda": pagoda.__file__}))


if __name__ == "__main__":
    main()

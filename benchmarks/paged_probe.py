"""Paged Gluon prefill vs the dense kernels on the `pagoda bench paged` shapes: device time (CUDA-graph replay
of the call, L2 not flushed), do_bench time (as the bench, L2 flushed) and host time per call (no sync),
for the paged wrapper and the 4-D dense call (flash_attn_func, the Gluon kernel on sm_90). Prints JSON
lines. Questions: is paged b8 s1024's gap to the dense Gluon kernel device or host time; does it shrink with
fewer, larger TMA boxes per tile (page 64, 128: 2 boxes or 1 per 128-key tile instead of 8)?

    PYTHONPATH=$PWD python3 benchmarks/paged_probe.py
"""
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


def main():
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

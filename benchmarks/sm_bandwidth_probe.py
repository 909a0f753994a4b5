"""How fast can ONE program (one SM) stream a row from DRAM? (H200 probe for issue 4's batch-1 samplers.)

Every batch-1 pass of the one-program samplers (top-p rounds, the min-p redraw) reads a row on one SM, and
session 7 measured ~28-32 GB/s whatever the prefetch depth: ~16 B per clock, as if the load path of one SM
(LSU / L1 misses) were the cap rather than DRAM latency. TMA bulk copies bypass that path. This times one
program summing a float32 row (CUDA-graph replay, L2 flushed: `pagoda.bench.timing.graph_time_ms`):

- ``ldg/w{W}/b{B}/d{D}``: plain ``tl.load`` of B-element blocks, W warps, D blocks issued ahead (the
  samplers' pattern: d4 is `sampling._track_pass`'s unfiltered loop);
- ``tma/w{W}/r{R}/s{S}``: the row viewed as ``[n / 256, 256]``, one host TMA descriptor, R x 256 blocks,
  S pipeline stages (Triton pipelines descriptor loads in a loop through shared memory and mbarriers);

beside an empty launch (the graph's floor) and ``torch.sum`` (many SMs). Prints one JSON line per row size:
µs per case and GB/s of the read beyond the floor. ``--aot`` compiles both kernels for sm_90 without a GPU.

    PYTHONPATH=$PWD python3 benchmarks/sm_bandwidth_probe.py > $OUT/sm-bandwidth-probe.txt
"""
import json
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _ldg_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr, DEPTH: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    x1 = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    x2 = x1
    x3 = x1
    if DEPTH >= 2:
        x2 = tl.load(x_ptr + BLOCK + offs, mask=BLOCK + offs < n, other=0.0)
    if DEPTH >= 3:
        x3 = tl.load(x_ptr + 2 * BLOCK + offs, mask=2 * BLOCK + offs < n, other=0.0)
    for start in range(0, n, BLOCK):
        cols = start + DEPTH * BLOCK + offs
        nxt = tl.load(x_ptr + cols, mask=cols < n, other=0.0)
        acc += x1
        if DEPTH == 1:
            x1 = nxt
        elif DEPTH == 2:
            x1 = x2
            x2 = nxt
        else:
            x1 = x2
            x2 = x3
            x3 = nxt
    tl.store(out_ptr, tl.sum(acc, 0))


@triton.jit
def _tma_sum(desc, out_ptr, rows, R: tl.constexpr, STAGES: tl.constexpr):
    acc = tl.zeros((R, 256), tl.float32)
    for r in tl.range(0, rows, R, num_stages=STAGES):
        acc += desc.load([r, 0])
    tl.store(out_ptr, tl.sum(tl.sum(acc, 1), 0))


LDG = [(w, b, d) for w in (8, 16, 32) for b in (2048, 4096, 8192) for d in (1, 3)
       if b // (32 * w) <= 32]
TMA = [(w, r, s) for w in (4, 8) for r in (16, 32, 64) for s in (2, 3, 4) if r * 256 * 4 * s <= 200 * 1024]


def _aot() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    k = triton.compile(ASTSource(fn=_ldg_sum, signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
                                 constexprs={"BLOCK": 4096, "DEPTH": 3}), target=target, options={"num_warps": 16})
    assert "ld.global" in k.asm["ptx"]
    k = triton.compile(ASTSource(fn=_tma_sum, signature={"desc": "tensordesc<fp32[32, 256]>", "out_ptr": "*fp32",
                                                         "rows": "i32"},
                                 constexprs={"R": 32, "STAGES": 3}), target=target, options={"num_warps": 8})
    assert "cp.async.bulk.tensor" in k.asm["ptx"], "the descriptor loads must become TMA copies"
    print("COMPILED")


def main() -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    from pagoda.bench.timing import graph_time_ms

    dev = torch.device("cuda")
    out = torch.empty(1, device=dev)
    floor = graph_time_ms(lambda: out.fill_(0.0), dev) * 1e3
    print(json.dumps({"case": "fill 1 element (graph floor)", "us": round(floor, 2)}), flush=True)
    for n in (32768, 151552, 1048576):                  # multiples of 256 (the TMA view)
        x = torch.rand(n, device=dev)
        want = x.double().sum().item()
        row = {"n": n, "MB": round(n * 4 / 1e6, 3), "torch.sum": round(graph_time_ms(lambda: x.sum(), dev) * 1e3, 2)}
        for w, b, d in LDG:
            def call(w=w, b=b, d=d):
                _ldg_sum[(1,)](x, out, n, BLOCK=b, DEPTH=d, num_warps=w)
            call()
            assert abs(out.item() - want) <= 1e-3 * abs(want), ("ldg", w, b, d)
            row[f"ldg/w{w}/b{b}/d{d}"] = round(graph_time_ms(call, dev) * 1e3, 2)
        x2 = x.view(n // 256, 256)
        for w, r, s in TMA:
            desc = TensorDescriptor.from_tensor(x2, [r, 256])

            def call(w=w, r=r, s=s, desc=desc):
                _tma_sum[(1,)](desc, out, n // 256, R=r, STAGES=s, num_warps=w)
            try:
                call()
                assert abs(out.item() - want) <= 1e-3 * abs(want), ("tma", w, r, s)
                row[f"tma/w{w}/r{r}/s{s}"] = round(graph_time_ms(call, dev) * 1e3, 2)
            except Exception as exc:  # report, keep going
                row[f"tma/w{w}/r{r}/s{s}"] = f"{type(exc).__name__}: {exc}"[:120]
        best = {k: v for k, v in row.items() if isinstance(v, float) and "/" in k}
        row["GB/s beyond floor, best 3"] = sorted(
            ((round(n * 4 / ((v - floor) * 1e-6) / 1e9, 1), k) for k, v in best.items() if v > floor), reverse=True)[:3]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    _aot() if "--aot" in sys.argv else main()

"""Host-side cost of a call on the GPU machine: cProfile of decode run() and top-p sampling, and the
launch cost of a trivial Triton kernel through `kernel[grid](...)` vs the compiled kernel's launcher.
GPU only: PYTHONPATH=$PWD python3 benchmarks/launch_probe.py"""
import cProfile
import io
import pstats
import time

import torch
import triton
import triton.language as tl

from overhead_probe import host_us


def profile(name, fn, n=300):
    print(f"== {name}: {host_us(fn, 300):.1f} us/call host")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
    print("\n".join(s.getvalue().splitlines()[6:34]))


@triton.jit
def _tiny(X, n, A: tl.constexpr):
    i = tl.arange(0, 16)
    tl.store(X + i, i.to(tl.float32), mask=i < n)


@triton.jit
def _wide(X, Y, Z, W, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, f1, f2, f3,
          A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, F: tl.constexpr):
    i = tl.arange(0, 16)
    tl.store(X + i, i.to(tl.float32) + a1 + f1, mask=i < a2)


def cascade():
    import pagoda.bench.cascade as cb

    case = cb.CascadeCase(4096, 256, 128)
    cache, q, page_lists, last = cb._layout(case, torch.device("cuda"), torch.bfloat16)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fn = cb._prepare("pagoda_cascade", case, cache, q, page_lists, last, ws)
    for _ in range(3):
        fn()
    profile("cascade run prefix4096 b128", fn, n=100)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(30)
    print("\n".join(s.getvalue().splitlines()[6:40]))


def main():
    x = torch.zeros(64, device="cuda")
    print(f"torch.empty cuda: {host_us(lambda: torch.empty(64, device='cuda')):.1f} us")
    print(f"tiny kernel[grid]: {host_us(lambda: _tiny[(1,)](x, 16, A=4)):.1f} us")
    ints = list(range(3, 19))
    print(f"wide kernel[grid]: {host_us(lambda: _wide[(1,)](x, x, x, x, *ints, 0.5, 1.5, 2.5, A=1, B=2, C=3, D=4, E=5, F=6)):.1f} us")
    ck = _tiny[(1,)](x, 16, A=4)
    stream = torch.cuda.current_stream().cuda_stream
    run = ck.run
    print(f"tiny ck.run direct: {host_us(lambda: run(1, 1, 1, stream, ck.function, ck.packed_metadata, None, None, None, x, 16, 4)):.1f} us")
    from triton.runtime import driver
    print(f"driver get_current_stream: {host_us(lambda: driver.active.get_current_stream(0)):.1f} us")

    from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper
    hq, hk, d, ps, batch, per = 32, 8, 128, 16, 1, 256
    cache = torch.randn(batch * per, 2, ps, hk, d, device="cuda", dtype=torch.bfloat16)
    indices = torch.randperm(batch * per, device="cuda").to(torch.int32)
    indptr = torch.tensor([0, per], dtype=torch.int32, device="cuda")
    last = torch.tensor([ps], dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    w = BatchDecodeWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"), "NHD")
    w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    profile("decode run b1 ctx4096", lambda: w.run(q, cache))

    import pagoda
    probs = torch.softmax(torch.randn(32, 151936, device="cuda"), -1)
    profile("top_p b32", lambda: pagoda.top_p_sampling_from_probs(probs, 0.9))
    profile("sampling b32", lambda: pagoda.sampling_from_probs(probs))


if __name__ == "__main__":
    import sys
    cascade() if sys.argv[1:] == ["cascade"] else main()

"""Is pagoda's HF generate slower, or is whichever implementation runs second slower? (GPU only.)

`e2e_profile.py` (H200, 2026-12-01) found the b128 dynamic-cache generate host-bound (1.1-1.3 s of host
time against 0.27 s of device time, equal for both) and every torch op's host time ~20% higher in the
pagoda run, which ran second: aten::mm 27.2 -> 35.7 µs, mul 13.5 -> 15.5, mean 16.3 -> 20.2. This times
one generate per implementation in the order sdpa, pagoda, sdpa, pagoda, then the same after
``gc.freeze()`` (the model's and the kernels' objects out of the cyclic GC's generations).

    PYTHONPATH=$PWD python3 benchmarks/e2e_order_probe.py [batch]
"""
import gc
import sys
import time

import torch

from pagoda.bench import e2e


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    device, model, sync = e2e.probe_model()   # qwen3-0.6b shape on CUDA, the tiny preset on the CPU

    def timed(impl):
        e2e._set_impl(model, impl)
        run = e2e._generate_fn(model, impl, batch, 128, 32, "dynamic", "none", device)
        run()
        sync()
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            run()
            sync()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    for phase in ("plain", "gc.freeze()"):
        if phase != "plain":
            gc.collect()
            gc.freeze()
        for impl in ("sdpa", "pagoda", "sdpa", "pagoda"):
            ms = timed(impl)
            print(f"{phase:12s} {impl:7s} b{batch}: {ms:7.1f} ms per generate, {batch * 32 / ms * 1e3:6.0f} tokens/s",
                  flush=True)


if __name__ == "__main__":
    main()

"""Host side of a HF generate, pagoda vs SDPA, function by function (GPU; a tiny CPU smoke run without one).

The e2e study reads pagoda at 0.95-0.97x SDPA's tokens/s at batch 128 (dynamic cache, qwen3-0.6b shape):
host-bound, ~25 µs more host time per layer and step that the torch profiler did not place (its op rows
are C++ ops; the Python between them is what differs). This builds the model once, alternates
sdpa / pagoda generates (wall clock, synced: 3 each), then runs one generate of each under cProfile and
prints, per implementation, the top functions by own time and by cumulative time, and the functions
whose own time differs most between the two (per generate of batch x 32 tokens).

    PYTHONPATH=$PWD python3 benchmarks/e2e_host_cprofile.py [batch] > $OUT/e2e-host-cprofile.txt
"""
import cProfile
import io
import pstats
import sys
import time

import torch

from pagoda.bench import e2e


def _own_times(prof: cProfile.Profile) -> dict:
    st = pstats.Stats(prof)
    return {f"{fn[0].split('site-packages/')[-1]}:{fn[1]}:{fn[2]}": (v[1], v[2], v[3]) for fn, v in st.stats.items()}


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    device, model, sync = e2e.probe_model()   # qwen3-0.6b shape on CUDA, the tiny preset on the CPU
    runs = {}
    for impl in ("sdpa", "pagoda"):
        e2e._set_impl(model, impl)
        runs[impl] = e2e._generate_fn(model, impl, batch, 128, 32, "dynamic", "none", device)
        runs[impl]()
        sync()
    walls = {"sdpa": [], "pagoda": []}
    for _ in range(3):
        for impl in ("sdpa", "pagoda"):
            e2e._set_impl(model, impl)
            sync()
            t0 = time.perf_counter()
            runs[impl]()
            sync()
            walls[impl].append(round((time.perf_counter() - t0) * 1e3, 1))
    print("wall ms per generate (alternating):", walls, flush=True)
    own = {}
    for impl in ("sdpa", "pagoda"):
        e2e._set_impl(model, impl)
        prof = cProfile.Profile()
        sync()
        prof.enable()
        runs[impl]()
        sync()
        prof.disable()
        own[impl] = _own_times(prof)
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(28)
            print(f"\n===== {impl}: top by {key}\n" + "\n".join(s.getvalue().splitlines()[6:40]), flush=True)
    print("\n===== own time, pagoda minus sdpa (ms per generate), largest first: calls sdpa/pagoda, own ms sdpa/pagoda")
    keys = set(own["sdpa"]) | set(own["pagoda"])
    diff = sorted(keys, key=lambda k: -(own["pagoda"].get(k, (0, 0, 0))[1] - own["sdpa"].get(k, (0, 0, 0))[1]))
    for k in diff[:30] + diff[-8:]:
        a, b = own["sdpa"].get(k, (0, 0, 0)), own["pagoda"].get(k, (0, 0, 0))
        print(f"{(b[1] - a[1]) * 1e3:9.2f}  {a[0]:7d}/{b[0]:<7d} {a[1] * 1e3:8.2f}/{b[1] * 1e3:<8.2f} {k}")


if __name__ == "__main__":
    main()

"""Where does a HF generate step go, pagoda vs SDPA? (GPU only.)

The e2e study of 2026-11-30 had pagoda at 0.84x SDPA's tokens/s at batch 128 with the dynamic cache
(~5 ms more per step of ~29 ms), far more than the attention calls' host time explains (28 layers x ~9 µs).
Per implementation this builds the qwen3-0.6b-shaped random model once, runs one warm-up generate
(batch 128, prompt 128, 32 new tokens, dynamic cache, greedy), times one generate (wall clock, synced),
then profiles one more with torch.profiler (CPU + CUDA) and prints the top operators by device time
and by host time, so the two columns can be read side by side.

    PYTHONPATH=$PWD python3 benchmarks/e2e_profile.py [batch] > $OUT/e2e-profile.txt
"""
import sys
import time

import torch

from pagoda.bench import e2e


def _table(prof, keys, rows):
    averages = prof.key_averages()
    for key in keys:
        try:
            return averages.table(sort_by=key, row_limit=rows, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):
            continue
    return "(no sort key of " + ", ".join(keys) + " is known to this torch)"


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    device, model, sync = e2e.probe_model()   # qwen3-0.6b shape on CUDA, the tiny preset on the CPU
    for impl in ("sdpa", "pagoda"):
        e2e._set_impl(model, impl)
        run = e2e._generate_fn(model, impl, batch, 128, 32, "dynamic", "none", device)
        run()
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        wall = time.perf_counter() - t0
        print(f"=== {impl}: batch {batch}, one generate (prompt 128, 32 new tokens) {wall * 1e3:.1f} ms, "
              f"{batch * 32 / wall:.0f} tokens/s", flush=True)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            run()
            sync()
        print(f"--- {impl}: top operators by device time", flush=True)
        print(_table(prof, ("self_device_time_total", "self_cuda_time_total", "device_time_total"), 22), flush=True)
        print(f"--- {impl}: top operators by host time (self)", flush=True)
        print(_table(prof, ("self_cpu_time_total",), 16), flush=True)


if __name__ == "__main__":
    main()

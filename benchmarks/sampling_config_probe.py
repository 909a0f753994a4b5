"""Launch-config and min-p path probe (H200, issue 4, session 9). Every figure is the mean over 8 seeds of
the CUDA-graph replay time (L2 flushed) of one call: a replayed graph repeats one draw, and the rejection
paths' cost depends on the draw.

1. The one-program sampler (`pagoda.kernels.sampling.row.sample`) at batch 1 / 8 / 32 for top-p, top-k, min-p
   and top-k + top-p, under (BLOCK, num_warps) = (4096, 16) (the default below 132 rows), (4096, 32) and
   (8192, 32). The SM streaming probe of 2026-12-01 read 0.6 MB on one SM in 11.0-11.7 µs with 16-32 warps
   and 3 loads in flight, 18.6 µs with 16 warps and 1 in flight: the rounds after pass 0 keep one in flight.
2. min-p on the split path: accept-or-redraw against the one-pass frontiers, batch 1 / 4 / 8.
One JSON line per (vocab, batch).

Session 10 (commit 8eb10b8, reverted after): a ``--deep`` mode timed the filter passes three chunks deep
against two at (4096, 16): no gain (min-p -0.2..-0.6 µs, top-k +-0.3, top-p +0.4..+4.5 µs slower at
V=128256 b8/b32); results in `results/2026-12-01-h200-session10/sampling-deep-probe.txt`."""
import json

import torch

from pagoda.bench.timing import graph_time_ms
from pagoda.kernels.sampling import row as K
from pagoda.kernels.sampling import split as SP

SEEDS = 8
CONFIGS = ((4096, 16), (4096, 32), (8192, 32))
ONE_PROGRAM = {"top_p": {"top_p": 0.9}, "top_k": {"top_k": 50}, "min_p": {"min_p": 0.05},
               "top_k_top_p": {"top_k": 50, "top_p": 0.9, "k_first": True}}


def mean_us(fn, seed_t, dev) -> float:
    total = 0.0
    for sd in range(SEEDS):
        seed_t.fill_(sd)
        total += graph_time_ms(fn, dev, warmup_ms=5, rep_ms=20) * 1e3
    return round(total / SEEDS, 2)


def main():
    dev = torch.device("cuda")
    seed = torch.zeros(1, dtype=torch.int64, device=dev)
    off = torch.zeros(1, dtype=torch.int64, device=dev)
    for vocab in (32000, 65536, 128256, 151936):
        for batch in (1, 4, 8, 32):
            p = torch.softmax(torch.randn(batch, vocab, device=dev) * 3, -1)
            out = torch.empty(batch, dtype=torch.int32, device=dev)
            valid = torch.empty(batch, dtype=torch.bool, device=dev)
            row = {"vocab": vocab, "batch": batch}
            if batch != 4 and vocab != 65536:
                for op, kw in ONE_PROGRAM.items():
                    args = {"top_k": None, "top_p": None, "min_p": None, **kw}
                    for block, warps in CONFIGS:
                        def call():
                            K.sample(p, out, valid, None, args["top_k"], args["top_p"], args["min_p"], seed, off,
                                     block=block, warps=warps, k_first=args.get("k_first", False))
                        call()
                        row[f"{op}/{block}w{warps}"] = mean_us(call, seed, dev)
            if batch <= 8:
                slices = SP.num_slices(vocab, batch, K.sm_count(dev))
                row["slices"] = slices
                for name, fr in (("min_p_split", False), ("min_p_frontier", True)):
                    def split():
                        SP.split_sample(p, out, valid, None, 0.05, seed, off, slices, frontier=fr)
                    split()
                    row[name] = mean_us(split, seed, dev)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

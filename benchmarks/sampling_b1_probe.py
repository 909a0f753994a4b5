"""Where a batch-1 sampler call spends its device time (H200 probe, issue 4): CUDA-graph replay (L2
flushed) of pagoda's plain / min-p / top-p sampler at batch 1 over vocab sizes (V=16 gives the fixed cost
of one launch + the races), two launch configs and the split-row sampler (`sampling_split`, plain and
min-p), beside a one-element fill (the graph's own floor) and torch.amax (one read). One JSON line per case."""
import json

import torch

from pagoda.bench.timing import graph_time_ms
from pagoda.kernels.sampling import row as K
from pagoda.kernels.sampling import split as SP


def main():
    dev = torch.device("cuda")
    seed = torch.zeros(1, dtype=torch.int64, device=dev)
    off = torch.zeros(1, dtype=torch.int64, device=dev)
    one = torch.empty(1, device=dev)
    print(json.dumps({"case": "fill 1 element", "us": round(graph_time_ms(lambda: one.fill_(1.0), dev) * 1e3, 2)}))
    for vocab in (16, 1024, 4096, 32000, 128256, 151936):
        p = torch.softmax(torch.randn(1, vocab, device=dev) * 3, -1)
        out = torch.empty(1, dtype=torch.int32, device=dev)
        valid = torch.empty(1, dtype=torch.bool, device=dev)
        row = {"vocab": vocab, "amax": round(graph_time_ms(lambda: torch.amax(p, -1), dev) * 1e3, 2)}
        for block in (None, 1024):
            for name, kw in (("plain", {}), ("min_p", {"min_p": 0.05}), ("top_p", {"top_p": 0.9})):
                args = {"top_k": None, "top_p": None, "min_p": None, **kw}

                def call():
                    K.sample(p, out, valid, None, args["top_k"], args["top_p"], args["min_p"], seed, off, block=block)
                call()
                row[f"{name}/{block or 'default'}"] = round(graph_time_ms(call, dev) * 1e3, 2)
        slices = SP.num_slices(vocab, 1, K.sm_count(dev))
        for name, mp, fr in (("plain", None, False), ("min_p", 0.05, False), ("min_p_frontier", 0.05, True)):
            def split():
                SP.split_sample(p, out, valid, None, mp, seed, off, slices, frontier=fr)
            split()
            row[f"{name}/split{slices}"] = round(graph_time_ms(split, dev) * 1e3, 2)
        # Over 8 seeds (a graph replays one draw; rejection paths depend on it): mean µs of min-p (accept-or-
        # redraw, frontier) and top-p (one program, frontiers) at batch 1.
        cases = [("min_p", lambda sdt: SP.split_sample(p, out, valid, None, 0.05, sdt, off, slices)),
                 ("min_p_frontier", lambda sdt: SP.split_sample(p, out, valid, None, 0.05, sdt, off, slices,
                                                                frontier=True)),
                 ("top_p_one_program", lambda sdt: K.sample(p, out, valid, None, None, 0.9, None, sdt, off))]
        if slices * SP.SLICE >= vocab:
            cases.append(("top_p_frontier", lambda sdt: SP.split_sample(p, out, valid, None, None, sdt, off, slices,
                                                                         top_p=0.9)))
        for name, fn in cases:
            times = []
            for sd in range(8):
                sdt = torch.full((1,), sd, dtype=torch.int64, device=dev)
                fn(sdt)
                times.append(graph_time_ms(lambda: fn(sdt), dev) * 1e3)
            row[f"{name}/mean8seeds"] = round(sum(times) / len(times), 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

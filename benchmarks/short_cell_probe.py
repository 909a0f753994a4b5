"""Re-time single cells of the attention grid through `pagoda.flash_attn_func` beside cuDNN SDPA (GPU only):
a check of one surprising grid figure (host-bound or a kernel regression). Per cell: 5 rounds of
`do_bench` (median of each), and the CUDA-graph-replayed time of one call (`graph_time_ms`: device time, no
host, L2 flushed between replays as `do_bench` does). The run of 19d0ff4 replayed back to back instead (L2
not flushed).

    PYTHONPATH=$PWD python3 benchmarks/short_cell_probe.py 32x512x128x0 32x512x64x0   # b x s x d x causal
"""
import sys

import torch
import triton.testing
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pagoda
from pagoda.bench.timing import graph_time_ms


for cell in sys.argv[1:]:
    b, s, d, c = (int(x) for x in cell.split("x"))
    h = 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    flops = 4 * b * s * s * h * d / (2 if c else 1)
    fns = {"pagoda": lambda: pagoda.flash_attn_func(q, k, v, causal=bool(c)),
           "cudnn": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=bool(c))}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        for name, fn in fns.items():
            rounds = [triton.testing.do_bench(fn, return_mode="median") for _ in range(5)]
            gms = graph_time_ms(fn, q.device)
            print(f"b={b} s={s} d={d} causal={c} {name:7s} do_bench rounds "
                  + " ".join(f"{flops / ms / 1e9:6.1f}" for ms in rounds)
                  + f" TF/s | graph {gms * 1e3:7.1f} us {flops / gms / 1e9:6.1f} TF/s", flush=True)

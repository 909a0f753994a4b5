"""Kernel-variant sweep for the prefill kernel on the GPU (tuning aid, not a user-facing study).

For each case it times cuDNN SDPA and every (variant, launch config) of pagoda's forward kernel,
checks each against SDPA, and prints TFLOP/s and the ratio to cuDNN.
Run on the GPU machine: PYTHONPATH=$PWD python3 benchmarks/attention_variants.py [--quick]
"""
import itertools
import sys

import torch
import triton.testing
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pagoda.kernels.attention.fwd import attention_fwd

CASES = [(d, causal, b, s) for d in (64, 128) for causal in (False, True) for b, s in ((32, 512), (4, 4096), (1, 16384))]
TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)]
VARIANTS = {"ptr": {}, "tma": {"USE_TMA": True}}


def main():
    quick = "--quick" in sys.argv
    rows = []
    for d, causal, b, s in CASES:
        h = 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        flops = 4 * b * s * s * h * d / (2 if causal else 1)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
            cudnn = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                            return_mode="median")
        c_tf = flops / cudnn / 1e9
        best = (0, "")
        for (vname, vflags), tile in itertools.product(VARIANTS.items(), TILES):
            cfg = dict(BLOCK_M=tile[0], BLOCK_N=tile[1], num_warps=tile[2], num_stages=tile[3], **vflags)
            out = torch.empty_like(q)

            def run():
                attention_fwd(q, k, v, out, None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=s,
                              batch_size=b, softmax_scale=d ** -0.5, window_left=-1,
                              window_right=0 if causal else -1, softcap=0.0, alibi_slopes=None, config=cfg)
            try:
                out.fill_(float("nan"))
                run()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = triton.testing.do_bench(run, return_mode="median")
            except Exception as exc:
                print(f"d={d} causal={causal} b={b} s={s} {vname} {tile}: FAILED {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:150] if str(exc) else ''}", flush=True)
                continue
            tf = flops / ms / 1e9
            ok = err < 1e-2
            rows.append((d, causal, b, s, vname, tile, tf, tf / c_tf, err))
            print(f"d={d:3d} causal={causal:d} b={b:2d} s={s:5d} {vname:7s} {str(tile):18s} {tf:6.1f} TF/s "
                  f"{tf / c_tf:5.2f}x cudnn ({c_tf:5.1f})  err={err:.1e}{'' if ok else '  WRONG'}", flush=True)
            if ok and tf > best[0]:
                best = (tf, f"{vname} {tile}")
        print(f"BEST d={d} causal={causal} b={b} s={s}: {best[1]} {best[0]:.1f} TF/s = {best[0] / c_tf:.2f}x cuDNN",
              flush=True)
        if quick:
            break


if __name__ == "__main__":
    main()

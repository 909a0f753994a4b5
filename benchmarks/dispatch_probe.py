"""Does `pagoda.flash_attn_func` cost more than the kernel it dispatches to? (GPU only.)

The 2026-11-30 attention grid read 189 TF/s for d=128 causal b32 s512 while `hopper_probe.py` timed the
Gluon kernel it dispatches to at 261. Per short shape this times, with the same `do_bench` (median, L2
flushed): the public call, the Gluon kernel called directly (default config), the Triton kernel called
directly, and the host time of one public call (no sync), all with Triton's own launch
(PAGODA_GLUON_FAST_LAUNCH=0); then the public call again with the Gluon kernels' repeat launch
(`pagoda.kernels.launch.tma`, the default since 2026-12-02): TFLOP/s, host time, and its largest
difference from the normal launch's output (0 expected: same kernel, same inputs).

    PYTHONPATH=$PWD python3 benchmarks/dispatch_probe.py
"""
import json
import os

import torch
import triton.testing
from overhead_probe import host_us  # benchmarks/ is sys.path[0] when run as a script

import pagoda
from pagoda.kernels.hopper import attention as H
from pagoda.kernels.attention.fwd import attention_fwd


def main():
    os.environ["PAGODA_GLUON_FAST_LAUNCH"] = "0"
    for d, causal, b, s in ((128, True, 32, 512), (128, False, 32, 512), (64, True, 32, 512), (128, True, 16, 1024),
                            (64, False, 4, 4096), (64, True, 4, 4096)):
        h = 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        flops = 4 * b * s * s * h * d / (2 if causal else 1)
        fns = {
            "flash_attn_func": lambda: pagoda.flash_attn_func(q, k, v, causal=causal),
            "gluon_direct": lambda: H.attention_fwd_hopper(q, k, v, out, lse, d ** -0.5, causal),
            "triton_direct": lambda: attention_fwd(q, k, v, out, lse, cu_seqlens_q=None, cu_seqlens_k=None,
                                                   max_seqlen_q=s, batch_size=b, softmax_scale=d ** -0.5,
                                                   window_left=-1, window_right=0 if causal else -1, softcap=0.0,
                                                   alibi_slopes=None),
        }
        row = {"d": d, "causal": causal, "b": b, "s": s, "dispatch_to_gluon": H.prefer_hopper(d, s)}
        for name, fn in fns.items():
            try:
                fn()
                ms = triton.testing.do_bench(fn, return_mode="median")
                row[name + "_TFs"] = round(flops / ms / 1e9, 1)
            except Exception as exc:  # noqa: BLE001 - report and go on
                row[name + "_TFs"] = f"{type(exc).__name__}: {exc}"[:120]
        row["flash_attn_func_host_us"] = round(host_us(fns["flash_attn_func"]), 1)
        # The Gluon kernels through the repeat launch (`pagoda.kernels.launch.tma`).
        os.environ["PAGODA_GLUON_FAST_LAUNCH"] = "1"
        try:
            fast = fns["flash_attn_func"]
            fast()
            row["fast_launch_TFs"] = round(flops / triton.testing.do_bench(fast, return_mode="median") / 1e9, 1)
            row["fast_launch_host_us"] = round(host_us(fast), 1)
            ref = pagoda.flash_attn_func(q, k, v, causal=causal)
            os.environ["PAGODA_GLUON_FAST_LAUNCH"] = "0"
            row["fast_launch_max_abs_diff"] = float((ref - pagoda.flash_attn_func(q, k, v, causal=causal)).abs().max())
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["fast_launch_TFs"] = f"{type(exc).__name__}: {exc}"[:120]
        finally:
            os.environ["PAGODA_GLUON_FAST_LAUNCH"] = "0"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

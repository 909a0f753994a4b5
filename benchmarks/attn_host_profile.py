"""Where do the ~100 µs of host time of one short `pagoda.flash_attn_func` call go? (GPU only.)

At b32 s512 the Gluon kernels take 110-190 µs and a call ~100-150 µs of host time, so a slow host shows in
the grid (NOTES "Session 12"). Per case: host µs per call (no sync): the public call and the Gluon launch
alone (prebuilt output), each with the repeat launch of `pagoda.kernels.launch.tma` (the default) and with
Triton's own (PAGODA_GLUON_FAST_LAUNCH=0); then cProfile's top functions by own time of the public call
(`pagoda.bench.hf_overhead._profile`).

    PYTHONPATH=$PWD python3 benchmarks/attn_host_profile.py > $OUT/attn-host-profile.txt
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead_probe import host_us  # noqa: E402

import pagoda  # noqa: E402
from pagoda.bench.hf_overhead import _profile  # noqa: E402
from pagoda.kernels.hopper import attention as H  # noqa: E402


def main():
    for d, causal in ((128, False), (128, True), (64, False)):
        b, s, h = 32, 512, 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = torch.empty_like(q)
        public = lambda: pagoda.flash_attn_func(q, k, v, causal=causal)  # noqa: E731
        gluon = lambda: H.attention_fwd_hopper(q, k, v, out, None, d ** -0.5, causal)  # noqa: E731
        row = {"public": host_us(public, 500), "attention_fwd_hopper": host_us(gluon, 500)}
        os.environ["PAGODA_GLUON_FAST_LAUNCH"] = "0"
        try:
            row["public, Triton launch"] = host_us(public, 500)
            row["attention_fwd_hopper, Triton launch"] = host_us(gluon, 500)
        finally:
            os.environ.pop("PAGODA_GLUON_FAST_LAUNCH")
        print(f"d={d} causal={causal:d} b={b} s={s} config={H.default_config(d, causal, s)}: host µs per call "
              + ", ".join(f"{name} {us:.1f}" for name, us in row.items()), flush=True)
        for line in _profile(public, 500, top=25):
            print("   " + line, flush=True)


if __name__ == "__main__":
    main()

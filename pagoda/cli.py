"""Command line: ``pagoda bench [attention] [--grid small|full] [--backends a,b] [--out DIR]``."""
from __future__ import annotations

import argparse
import sys

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bench(args) -> int:
    from pagoda.bench import attention
    from pagoda.bench.report import write_outputs

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = args.grid or ("full" if device.type == "cuda" else "small")
    dtype = _DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    head_dims = tuple(int(x) for x in args.head_dims.split(",")) if args.head_dims else (64, 128)
    report = attention.run_study(grid, backends, device, dtype, head_dims=head_dims)
    print(attention.tables(report))
    if args.out:
        paths = write_outputs(args.out, "attention", report, attention.tables(report, markdown=True))
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="pagoda: LLM-serving attention kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark attention backends side by side")
    bench.add_argument("study", nargs="?", default="attention", choices=["attention"],
                       help="which study to run (default: attention, the prefill grid)")
    bench.add_argument("--grid", choices=["small", "full"], help="default: full on CUDA, small on CPU")
    bench.add_argument("--backends", help="comma-separated subset of backends (default: all)")
    bench.add_argument("--head-dims", help="comma-separated head dims (default: 64,128)")
    bench.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    bench.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    bench.add_argument("--out", help="directory for JSON, CSV and Markdown results")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

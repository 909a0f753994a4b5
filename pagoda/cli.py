"""Command line: ``pagoda bench [STUDY] [options]``, ``pagoda bench compare A.json B.json`` and
``pagoda generate MODEL_DIR --prompt ...`` (`pagoda.engine.cli`)."""
from __future__ import annotations

import argparse
import sys

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _csv(text: str | None, cast=str):
    return [cast(x.strip()) for x in text.split(",") if x.strip()] if text else None


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _bench(args) -> int:
    from pagoda.bench.plots import plot
    from pagoda.bench.report import write_outputs
    from pagoda.bench.studies import STUDIES, BenchOptions

    if args.study == "compare":
        from pagoda.bench.compare import compare
        if len(args.reports) != 2:
            raise SystemExit("usage: pagoda bench compare A.json B.json")
        print(compare(*args.reports))
        return 0
    if args.reports:
        raise SystemExit(f"unexpected arguments: {' '.join(args.reports)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts = BenchOptions(
        device=device, grid=args.grid or ("full" if device.type == "cuda" else "small"),
        dtype=_DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")],
        backends=_csv(args.backends), head_dims=tuple(_csv(args.head_dims, int) or (64, 128)),
        model=args.model, batch_sizes=tuple(_csv(args.batch_sizes, int) or ()) or None,
        max_batch_search=args.max_batch_search, budget_s=args.budget_s)
    if device.type == "cpu":
        # One intra-op thread by default: on a shared or busy host, OpenMP's spinning threads make
        # millisecond-scale CPU figures jump by 10x between neighbouring cells.
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    study = STUDIES[args.study]
    report = study.run(opts)
    print(study.tables(report))
    if args.out:
        paths = write_outputs(args.out, study.name, report, study.tables(report, markdown=True))
        paths += plot(report, args.out)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pagoda.bench.studies import STUDIES

    parser = argparse.ArgumentParser(prog="pagoda", description="pagoda: LLM-serving attention kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark attention backends side by side",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="studies:\n" + "\n".join(f"  {s.name:10s} {s.help}" for s in STUDIES.values())
                           + "\n  compare    pagoda bench compare A.json B.json: ratios between two runs")
    bench.add_argument("study", nargs="?", default="attention", choices=list(STUDIES) + ["compare"],
                       help="which study to run (default: attention)")
    bench.add_argument("reports", nargs="*", help=argparse.SUPPRESS)
    bench.add_argument("--grid", choices=["small", "full"], help="default: full on CUDA, small on CPU")
    bench.add_argument("--backends", help="comma-separated subset of backends / implementations (default: all)")
    bench.add_argument("--head-dims", help="attention: comma-separated head dims (default: 64,128)")
    bench.add_argument("--model", help="e2e: model preset (llama-3-8b, qwen3-0.6b, tinyllama-1.1b, tiny) or folder")
    bench.add_argument("--batch-sizes", help="e2e: comma-separated batch sizes")
    bench.add_argument("--max-batch-search", action=argparse.BooleanOptionalAction, default=None,
                       help="e2e: search the largest batch before OOM (GPU only)")
    bench.add_argument("--budget-s", type=_non_negative,
                       help="sampling, e2e: start no case past this many seconds (the first always runs); the "
                            "cases not run are listed in the report")
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default on a CPU: 1, for stable figures)")
    bench.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    bench.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    bench.add_argument("--out", help="directory for JSON, CSV, Markdown and PNG results")
    bench.set_defaults(func=_bench)
    from pagoda.engine.cli import add_generate_parser

    add_generate_parser(sub)
    from pagoda.server.cli_args import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "serve"]:   # the HTTP load generator has options of its own
        from pagoda.bench.serve import main as bench_serve
        return bench_serve(argv[2:])
    if argv[:2] == ["bench", "engine"]:  # the engine benchmark too (workload, --batch-1, --no-hf)
        from pagoda.bench.engine import main as bench_engine
        return bench_engine(argv[2:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

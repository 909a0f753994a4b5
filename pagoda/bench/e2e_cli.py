"""``python3 -m pagoda.bench.e2e``: the e2e study's command line (the presets and axes that ``pagoda bench e2e``
does not expose), writing JSON, CSV, Markdown and plots with ``--out``."""
from __future__ import annotations

import argparse
import sys

import torch

from pagoda.bench import e2e
from pagoda.bench import report as _report
from pagoda.bench.budget import reason
from pagoda.bench.e2e_report import tables


def _names(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv=None) -> int:
    """Parse ``argv`` (default: the process's), run the study, print its tables; 0 on success."""
    from pagoda.bench.plots import plot

    p = argparse.ArgumentParser(prog="python3 -m pagoda.bench.e2e", description=e2e.__doc__.splitlines()[0])
    p.add_argument("--grid", default=None, choices=sorted(e2e.GRIDS), help="default: gpu on CUDA, small elsewhere")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--backends", help="comma-separated implementations (default: all)")
    p.add_argument("--model")
    p.add_argument("--batch-sizes")
    p.add_argument("--budget-s", type=float)
    p.add_argument("--case-limit-s", type=float, help="upper bound of one case (its warm-up compiles included)")
    p.add_argument("--caches", help=f"comma-separated, of {','.join(e2e.CACHES)}")
    p.add_argument("--processors", help="comma-separated, of none,repetition_penalty,sample_hf,sample_pagoda "
                   "(the last two: do_sample=True, top_k=50, top_p=0.9 with HF's or pagoda's warpers)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--no-max-batch-search", action="store_true")
    p.add_argument("--out")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = e2e.default_config(device, a.grid or ("gpu" if device.type == "cuda" else "small"))
    if a.model:
        cfg.model = a.model
    if a.batch_sizes:
        cfg.batch_sizes = tuple(int(x) for x in _names(a.batch_sizes))
    if a.budget_s is not None:
        cfg.budget_s = a.budget_s
    if a.case_limit_s is not None:
        cfg.case_limit_s = a.case_limit_s
    if a.caches:
        cfg.caches = _names(a.caches)
    if a.processors:
        cfg.processors = _names(a.processors)
    if a.prompt_len:
        cfg.prompt_len = a.prompt_len
    if a.new_tokens:
        cfg.new_tokens = a.new_tokens
    if a.no_max_batch_search:
        cfg.max_batch_search = False
    cfg.__post_init__()
    backends = list(_names(a.backends)) if a.backends else None
    command = " ".join(["python3 -m pagoda.bench.e2e"] + list(sys.argv[1:] if argv is None else argv))
    report = e2e.run_study(cfg, backends, device, dtype, out=a.out, command=command)
    print(tables(report))
    if a.out:
        paths = _report.write_outputs(a.out, "e2e", report, tables(report, markdown=True))
        try:
            paths += plot(report, a.out)
        except Exception as exc:  # the data is written; a plot failure is only reported
            print(f"e2e: plot failed: {reason(exc)}")
        print("\nwrote " + ", ".join(str(x) for x in paths))
    return 0

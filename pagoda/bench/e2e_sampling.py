"""Sampling cases of the e2e study (`pagoda.bench.e2e`): ``generate(do_sample=True, top_k=50, top_p=0.9)`` with HF's
sorting warpers (processor ``sample_hf``) and with pagoda's sorting-free ones (``sample_pagoda``,
`pagoda.integrations.hf_sampling`), and the time of one sampling step on its own.

The sampling step is what HF's ``_sample`` does per decode step after the forward: the processor list generate
builds for these arguments (top-k 50 then top-p 0.9), softmax, ``torch.multinomial``. It is timed per batch on two
kinds of ``[batch, vocab]`` float32 logits: the study model's last-position logits (what its generate samples
from: a random-weight model's rows are flat) and ``randn * 3`` rows (spread as a trained model's are).
"""
from __future__ import annotations

import contextlib

import torch

from pagoda.bench import report as _report

SAMPLERS = ("sample_hf", "sample_pagoda")      # values of the study's processor axis
TOP_K, TOP_P = 50, 0.9
SOURCES = ("model", "randn*3")


def is_sampling(processor: str) -> bool:
    return processor in SAMPLERS


def generate_kwargs(processor: str) -> dict:
    """generate() arguments of a sampling processor (``{}`` for the others, which decode greedily)."""
    return dict(do_sample=True, top_k=TOP_K, top_p=TOP_P, temperature=1.0) if is_sampling(processor) else {}


def context(processor: str):
    """The warpers a generate of ``processor`` runs with: pagoda's for ``sample_pagoda``, HF's for ``sample_hf``;
    nothing switched for the others."""
    if not is_sampling(processor):
        return contextlib.nullcontext()
    from pagoda.integrations import hf_sampling
    return hf_sampling.sampling(processor == "sample_pagoda")


def _chains():
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from pagoda.integrations import hf_sampling
    hf = LogitsProcessorList([TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P)])   # what generate builds for them
    return {"sample_hf": hf, "sample_pagoda": hf_sampling.swap_warpers(hf)}


def _logits(model, source: str, batch: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(batch)
    vocab = model.config.vocab_size
    if source == "randn*3":
        return torch.randn(batch, vocab, device=device, generator=g) * 3
    ids = torch.randint(3, vocab, (batch, 8), device=device, generator=g)
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -1].to(copy=True, dtype=torch.float32)   # as _sample takes them


def sampling_step(model, device, batch_sizes, time_fn=None) -> list[dict]:
    """One row per (batch, logits source): ms of one sampling step with HF's warpers and with pagoda's, their ratio,
    and how far apart the kept sets are (isfinite of the processed scores): tokens kept by one only, and their
    largest mass in a row (ties at the top-p boundary are kept alike only where HF's sort is stable, as CUDA's is on
    long rows; HF's float32 cumsum places its boundary to within rounding)."""
    from pagoda.bench.timing import time_ms

    time_fn = time_fn or time_ms
    chains = _chains()
    rows = []
    for batch in batch_sizes:
        for source in SOURCES:
            logits = _logits(model, source, batch, device)
            ids = torch.zeros(batch, 1, dtype=torch.long, device=device)

            def step(chain, logits=logits, ids=ids):
                scores = chain(ids, logits)
                return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

            row = dict(batch=batch, vocab=logits.shape[1], logits=source)
            for name, chain in chains.items():
                row[f"{name}_ms"] = round(time_fn(lambda chain=chain: step(chain), device), 4)
            row["speedup"] = round(row["sample_hf_ms"] / row["sample_pagoda_ms"], 2)
            hf, pg = (torch.isfinite(chains[n](ids, logits)) for n in SAMPLERS)
            row["kept_tokens_hf"] = round(float(hf.sum(-1).double().mean()), 1)
            row["kept_tokens_differ"] = int((hf ^ pg).sum())
            # Mass of the tokens one kept and the other did not, under the softmax over both kept sets (the larger
            # of the two distributions' total variation, per row): rounding-size where HF's float32 cumsum decides.
            p = torch.where(hf | pg, logits.double(), float("-inf")).softmax(-1)
            row["kept_differ_mass"] = float(f"{float((p * (hf ^ pg)).sum(-1).max()):.3g}")
            rows.append(row)
    return rows


def tables(report: dict, markdown: bool = False) -> list[str]:
    """The sampling step's time, and tokens/s of generate with HF's warpers vs pagoda's per implementation,
    cache and batch (blocks for `pagoda.bench.e2e_report.tables`; none when the study sampled nothing)."""
    out = []
    fmt = _report.markdown_table if markdown else (lambda h, r: _report.format_table(h, r, 0))
    step = report.get("sampling_step")
    if isinstance(step, list) and step:
        headers = ["batch", "logits", "HF warpers ms", "pagoda warpers ms", "HF / pagoda", "tokens kept by HF",
                   "kept by one only (max mass)"]
        rows = [[r["batch"], r["logits"], r["sample_hf_ms"], r["sample_pagoda_ms"], f"{r['speedup']:.2f}x",
                 r["kept_tokens_hf"], f"{r['kept_tokens_differ']} ({r['kept_differ_mass']:.2g})"] for r in step]
        title = (f"One sampling step (top-k {TOP_K}, top-p {TOP_P}: processors + softmax + multinomial, as HF's "
                 f"_sample), vocab {step[0]['vocab']}")
        out.append((f"### {title}\n\n" if markdown else title + "\n") + fmt(headers, rows))
    elif isinstance(step, dict) and step.get("error"):
        out.append(f"Sampling step: {step['error']}")
    cells = {}
    for r in report.get("results", []):
        if r["processor"] in SAMPLERS + ("none",):
            cells.setdefault((r["cache"], r["impl"], r["batch"]), {})[r["processor"]] = r
    if not any(SAMPLERS[0] in c or SAMPLERS[1] in c for c in cells.values()):
        return out

    def tps(cell, proc):
        r = cell.get(proc)
        return "-" if r is None else (f"{r['tokens_per_s']:.1f}" if r["status"] == "ok" else r["status"])

    rows = []
    for (cache, impl, batch), cell in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        hf, pg = cell.get("sample_hf"), cell.get("sample_pagoda")
        ratio = (f"{pg['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf and pg and hf["status"] == pg["status"] == "ok"
                 else "-")
        rows.append([cache, impl, batch, tps(cell, "none"), tps(cell, "sample_hf"), tps(cell, "sample_pagoda"), ratio])
    headers = ["cache", "attention", "batch", "greedy tok/s", "HF warpers tok/s", "pagoda warpers tok/s",
               "pagoda / HF warpers"]
    title = f"{report['meta']['model']}: generate(do_sample=True, top_k={TOP_K}, top_p={TOP_P}) tokens/s"
    out.append((f"### {title}\n\n" if markdown else title + "\n") + fmt(headers, rows))
    return out

"""``pagoda bench engine --processors``: controlled generation at full speed, on the engine benchmark's requests.

HF ``generate`` with a per-step Python logits processor on its static cache (compiled on a GPU, as generate does
by default: CUDA graphs) and its dynamic cache, each beside the same cache without it; pagoda's engine with the
same constraint through its built-in logits processing, through a batch-level processor
(`pagoda.engine.logits_processors.LogitsProcessor`) and through per-request Python callables, beside the same
engine without processors, and pagoda's structured output (an xgrammar regex over the whole output). Every row
reports its throughput as a fraction of its own system without processors (``vs_plain``); pagoda's targets: at
least 0.9 with the built-in and batch-level forms, at least 0.8 with structured output.

The constraint: a repetition penalty of 1.2 over the prompt and output tokens (HF's and vLLM's definition,
which agree) and a ban on `BANNED` (256 token ids). HF: one Python `transformers.LogitsProcessor` doing both
with tensor ops on the batch (its left padding is penalised too, as HF's own processor does). pagoda:
``repetition_penalty=1.2`` always; the ban as ``logit_bias`` -100 (built-in), as a registered batch-level
processor that fills the banned ids with -inf, or as a callable per request and step.

Structured output: the regex `STRUCTURED_REGEX` (outputs made only of tokens whose text starts with ``t1`` to
``t5``: about half of the benchmark tokenizer's vocabulary); xgrammar fills each request's token bitmask on the
host every step, the engine applies the masks on the device. The regex may end after any token, where the
grammar allows EOS; with ``ignore_eos`` a sampled EOS would end the grammar but not the request, whose later
tokens would run unconstrained. So the structured requests also set ``min_tokens = max_tokens`` (EOS banned by
the built-in processing until the end): every step of every request is constrained.
"""
from __future__ import annotations

import gc
import tempfile
import time

import torch

from pagoda.bench import engine as _eb
from pagoda.bench import report as _report
from pagoda.bench.stats import percentile
from pagoda.engine.logits_processors import LogitsProcessor

_sig = _report.significant
BANNED = [7 * i + 11 for i in range(256)]
PENALTY = 1.2
PAGODA_VARIANTS = ("plain", "builtin", "batch-level", "callables", "structured")
STRUCTURED_REGEX = r"(t[1-5][0-9]*)+"


def banned(vocab_size: int) -> list[int]:
    """`BANNED` inside a vocabulary (a tiny test model's is smaller)."""
    return [t for t in BANNED if t < vocab_size]
HF_CACHES = ("static", "dynamic")


class BanTokens(LogitsProcessor):
    """A batch-level processor: every row's `BANNED` ids get -inf (one masked fill on the device). It reads
    no output tokens, so the engine keeps overlapping its steps."""

    reads_output_token_ids = False

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.mask = torch.zeros(vllm_config.hf_config.vocab_size, dtype=torch.bool, device=device)
        self.mask[banned(self.mask.shape[0])] = True

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        return None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill_(self.mask, float("-inf"))


def _ban_callable(device: torch.device, vocab_size: int):
    ids = torch.tensor(banned(vocab_size), device=device)

    def ban(output_token_ids, logits):
        return logits.index_fill_(0, ids, float("-inf"))
    return ban


def _sampling_kwargs(variant: str, device: torch.device, vocab_size: int) -> dict:
    if variant == "plain":
        return {}
    if variant == "structured":
        from pagoda.engine import StructuredOutputsParams

        return dict(structured_outputs=StructuredOutputsParams(regex=STRUCTURED_REGEX))
    kw: dict = dict(repetition_penalty=PENALTY)
    if variant == "builtin":
        kw["logit_bias"] = {t: -100.0 for t in banned(vocab_size)}
    elif variant == "callables":
        kw["logits_processors"] = [_ban_callable(device, vocab_size)]
    return kw


def _drive(engine, requests, tag: str, extra: dict, cfg) -> float:
    from pagoda.engine import RequestOutputKind, SamplingParams

    for j, (p, n) in enumerate(requests):
        floor = dict(min_tokens=n) if "structured_outputs" in extra else {}    # the grammar never sees EOS
        engine.add_request(f"{tag}{j}", {"prompt_token_ids": p},
                           SamplingParams(temperature=cfg.temperature, ignore_eos=True, max_tokens=n,
                                          output_kind=RequestOutputKind.FINAL_ONLY, **extra, **floor))
    sync = torch.cuda.synchronize if engine.model_runner.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sync()
    return time.perf_counter() - t0


def run_pagoda(model_dir: str, requests, warmup, cfg, load_format: str, variants=PAGODA_VARIANTS) -> list[dict]:
    """One row per variant. "batch-level" runs on an engine with `BanTokens` registered (a registered processor
    is active on every step), the others share one engine; the prefix cache is cleared between runs."""
    from pagoda.engine import EngineConfig, LLMEngine
    from pagoda.engine.llm_engine import StepStats

    rows = []
    groups = [[v for v in variants if v != "batch-level"], [v for v in variants if v == "batch-level"]]
    for group in groups:
        if not group:
            continue
        engine = LLMEngine(EngineConfig(model=model_dir, load_format=load_format, dtype=cfg.dtype, seed=cfg.seed,
                                        max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
                                        gpu_memory_utilization=cfg.gpu_memory_utilization,
                                        logits_processors=[BanTokens] if group == ["batch-level"] else None))
        device = engine.model_runner.device
        for variant in group:
            extra = _sampling_kwargs(variant, device, engine.vocab_size)
            _drive(engine, warmup, f"w{variant}", extra, cfg)      # compiles every kernel shape of the variant
            engine.block_manager.reset_prefix_cache()
            engine.stats = StepStats(decode_host_steps=[])
            elapsed = _drive(engine, requests, f"r{variant}", extra, cfg)
            engine.block_manager.reset_prefix_cache()
            st = engine.stats
            outs = sum(n for _, n in requests)
            rows.append(dict(system=f"pagoda-{variant}", status="ok", requests=len(requests), elapsed_s=_sig(elapsed),
                             output_tok_s=_sig(outs / elapsed), graph_steps=st.graph_steps,
                             decode_step_ms=_sig(1e3 * (st.decode_host_s + st.decode_wait_s)
                                                 / max(st.decode_steps, 1)),
                             decode_host_p50_ms=_sig(1e3 * percentile(st.decode_host_steps, 50))
                             if st.decode_host_steps else None,
                             decode_host_frac=_sig(st.decode_host_s / max(st.decode_host_s + st.decode_wait_s,
                                                                            1e-12))))
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _hf_constraint(vocab: int, device: torch.device):
    import transformers

    ids = torch.tensor(banned(vocab), device=device)

    class Constraint(transformers.LogitsProcessor):
        """The constraint as a HF user writes it: Python, called by generate once per step on the batch."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            score = torch.gather(scores, 1, input_ids)
            score = torch.where(score < 0, score * PENALTY, score / PENALTY)
            scores = scores.scatter(1, input_ids, score)
            return scores.index_fill_(1, ids, float("-inf"))

    return transformers.LogitsProcessorList([Constraint()])


def run_hf(model_dir: str, hf_config, requests, cfg, device: torch.device, dtype: torch.dtype,
           caches=HF_CACHES) -> list[dict]:
    """Per cache: HF generate (sdpa) without and with the Python constraint, static batches as
    `pagoda.bench.engine_hf` runs them, each run stopped past ``cfg.hf_budget_s`` (partial figure)."""
    from pagoda.bench.budget import reason
    from pagoda.bench.e2e import _set_impl, cache_kwargs
    from pagoda.bench.engine_hf import _batch_size, _build, _generate_timed

    try:
        model = _build(model_dir, hf_config, device, dtype, dummy=cfg.model is None)
        _set_impl(model, "sdpa")
    except Exception as exc:
        return [dict(system=f"hf-{c}", status=f"error: {reason(exc)}") for c in caches]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    max_cache = max(len(p) for p, _ in requests) + max(n for _, n in requests)
    b = _batch_size(hf_config, itemsize, max_cache, device, len(requests))
    batches = [requests[i:i + b] for i in range(0, len(requests), b)]
    constraint = _hf_constraint(hf_config.vocab_size, device)
    rows = []
    for cache in caches:
        name = "compiled" if cache == "static" and device.type == "cuda" else cache
        torch._dynamo.reset()
        for with_proc in (False, True):
            system = f"hf-{cache}" + ("-processor" if with_proc else "")
            try:
                done_out, elapsed, partial = 0, 0.0, False
                for j, batch in enumerate(batches):
                    left = cfg.hf_budget_s - elapsed
                    if left <= 0:
                        partial = True
                        break
                    extra = dict(cache_kwargs(name), **({"logits_processor": constraint} if with_proc else {}))
                    steps, seconds = _generate_timed(model, batch, extra, cfg.temperature, device, j == 0, left)
                    elapsed += seconds
                    partial = partial or steps < max(n for _, n in batch)
                    done_out += sum(min(n, steps) for _, n in batch)
                    if partial:
                        break
                rows.append(dict(system=system, status="ok", requests=len(requests), elapsed_s=_sig(elapsed),
                                 output_tok_s=_sig(done_out / elapsed),
                                 note=f"batch {b}, {name} cache" + (", partial (budget)" if partial else "")))
            except Exception as exc:
                rows.append(dict(system=system, status=f"error: {reason(exc)}"))
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """``vs_plain``: each row's output tokens/s over its own system's run without processors."""
    base = {r["system"]: r.get("output_tok_s") for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        s = r["system"]
        ref = base.get("pagoda-plain") if s.startswith("pagoda-") else base.get(s.removesuffix("-processor"))
        if ref:
            r["vs_plain"] = _sig(r["output_tok_s"] / ref)


def run_study(cfg, device: torch.device | None = None, variants=PAGODA_VARIANTS, caches=HF_CACHES) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, load_format, hf_config, cfg = _eb.bench_model(cfg, tmp)
        requests = _eb.make_requests(cfg)
        warmup = _eb.warmup_requests(cfg)
        rows = run_pagoda(model_dir, requests, warmup, cfg, load_format, variants)
        if cfg.hf and caches:
            dtype = {"float32": torch.float32, "float16": torch.float16}.get(
                cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
            rows += run_hf(model_dir, hf_config, requests, cfg, device, dtype, caches)
    _add_ratios(rows)
    meta = _report.environment(device)
    meta.update(workload=dict(num_requests=cfg.num_requests, lengths=[cfg.min_len, cfg.max_len], seed=cfg.seed,
                              temperature=cfg.temperature, ignore_eos=True, max_model_len=cfg.max_model_len,
                              model=cfg.model or "qwen3-0.6b dummy"),
                constraint=dict(repetition_penalty=PENALTY, banned=len(BANNED)))
    return {"study": "engine-processors", "meta": meta, "backends": {}, "results": rows}


def tables(report: dict, markdown: bool = False) -> str:
    rows = report["results"]
    cols = ["system", "status", "requests", "elapsed_s", "output_tok_s", "vs_plain", "decode_step_ms",
            "decode_host_p50_ms", "decode_host_frac", "graph_steps", "note"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    fmt = _report.markdown_table if markdown else _report.format_table
    c = report["meta"]["constraint"]
    head = (f"constraint: repetition penalty {c['repetition_penalty']}, {c['banned']} banned token ids; vs_plain: "
            "output tokens/s over the same system without processors")
    return head + "\n\n" + fmt(cols, [[r.get(k) for k in cols] for r in rows])

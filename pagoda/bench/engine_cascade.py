"""``pagoda bench engine --cascade``: the engine's decode step over a long shared system prompt, with cascade
attention (``cascade="on"``: the shared pages read once per layer, in the cascade decode graphs) and without
(``"off"``: the plain decode graphs, the prompt read once per request), on the same requests.

Workload: 64 requests sharing a 4,096-token system prompt (cached by an earlier request) with 256 unique tokens
each, greedy, every request decoding together. Model: Llama-2-7B's layer shapes (32 query and 32 KV heads of
128), 8 layers, dummy weights. Plain decode reads 64 x 4,352 tokens of KV per layer and step, the cascade
4,096 + 64 x 256: in bf16 per layer 4.6 GB against 0.34 GB. Figures: ms per decode step of the full batch (the
median over the timed steps of the time between returns of ``step()``; the means beside it), the speedup, and
whether the greedy tokens agree (float32: identical, or first differing where the plain engine's two best
logprobs tie within float32 noise; bf16: the count of requests that agree).
"""
from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pagoda.bench import report as _report

LLAMA_2_7B_8_LAYERS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
                           num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=10000.0,
                           max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5)
SYSTEM, UNIQUE, BATCH, WARM, TIMED = 4096, 256, 64, 4, 16
_sig = _report.significant


def requests(vocab: int):
    """The system prompt's ids and each request's prompt (system + unique ids), ids in ``[3, vocab)``."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, vocab, (SYSTEM,), generator=g).tolist()
    return shared, [shared + torch.randint(3, vocab, (UNIQUE,), generator=g).tolist() for _ in range(BATCH)]


def run_mode(model_dir: str, dtype: str, mode: str, gpu_memory_utilization: float = 0.45) -> dict:
    """One engine with ``cascade=mode``: seconds per decode step of the full batch, each request's tokens and
    logprobs (top 2), cascade / graph step counts and cached-prefix lengths."""
    from pagoda.engine import SamplingParams
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.kernels.launch.fast import tuned_choices

    tuned_before = tuned_choices()       # what this engine's capture and steps tune is new below

    engine = LLMEngine(EngineConfig(model_dir, load_format="dummy", dtype=dtype, max_model_len=SYSTEM + UNIQUE + 512,
                                    max_num_seqs=BATCH, gpu_memory_utilization=gpu_memory_utilization, cascade=mode))
    shared, prompts = requests(engine.vocab_size)
    engine.add_request("system", {"prompt_token_ids": shared + [5]}, SamplingParams(max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    params = SamplingParams(temperature=0, max_tokens=WARM + TIMED + 4, ignore_eos=True, logprobs=2)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    outs: dict[str, object] = {}

    def step():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    while engine.stats.decode_steps < WARM:
        step()
    sync()
    d0, t0 = engine.stats.decode_steps, time.perf_counter()
    ends = []
    for _ in range(TIMED):
        step()
        ends.append(time.perf_counter())
    sync()
    mean_step = (time.perf_counter() - t0) / TIMED
    # One step() returns when the step before it has finished on the device, so in the steady state the time
    # between returns is the step's period; the median keeps out a one-off (a kernel loaded on first use).
    per_step = statistics.median(b - a for a, b in zip([t0, *ends], ends, strict=False))
    timed = engine.stats.decode_steps - d0
    while engine.has_unfinished_requests():
        step()
    tuned = {k: v for k, v in tuned_choices().items() if k not in tuned_before}
    result = dict(per_step_s=per_step, mean_step_s=mean_step, timed_steps=timed, graph_steps=engine.stats.graph_steps,
                  tuned=tuned,
                  cascade_steps=dict(engine.model_runner.cascade_steps),
                  cached=[o.num_cached_tokens for o in outs.values()],
                  tokens={k: o.outputs[0].token_ids for k, o in outs.items()},
                  logprobs={k: o.outputs[0].logprobs for k, o in outs.items()})
    engine = None     # the next engine in this process gets its memory back
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def near_tie(lp: dict, eps: float = 1e-3) -> bool:
    """Whether a step's two best logprobs are within ``eps``."""
    best = sorted((v.logprob for v in lp.values()), reverse=True)[:2]
    return len(best) == 2 and best[0] - best[1] < eps


def agreement(plain: dict, cascade: dict) -> tuple[int, int]:
    """(requests with identical tokens, requests whose first difference is at a near-tie of the plain run)."""
    same = tie = 0
    for rid, ref in plain["tokens"].items():
        got = cascade["tokens"][rid]
        if got == ref:
            same += 1
        else:
            i = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            tie += i < len(ref) and near_tie(plain["logprobs"][rid][i])
    return same, tie


def run_study(dtypes=("bfloat16", "float32")) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from pagoda.bench.engine import dummy_model_dir

        model_dir = str(dummy_model_dir(LLAMA_2_7B_8_LAYERS, "llama", Path(tmp)))
        for dtype in dtypes:
            runs = {}
            for mode in ("off", "on"):
                runs[mode] = run_mode(model_dir, dtype, mode)
                print(f"engine-cascade: {dtype} cascade={mode}: {1e3 * runs[mode]['per_step_s']:.3f} ms a step "
                      f"(median; mean {1e3 * runs[mode]['mean_step_s']:.3f})",
                      flush=True)
            same, tie = agreement(runs["off"], runs["on"])
            plain, casc = runs["off"]["per_step_s"], runs["on"]["per_step_s"]
            rows.append(dict(dtype=dtype, requests=BATCH, system_tokens=SYSTEM, unique_tokens=UNIQUE,
                             plain_step_ms=_sig(1e3 * plain), cascade_step_ms=_sig(1e3 * casc),
                             plain_mean_ms=_sig(1e3 * runs["off"]["mean_step_s"]),
                             cascade_mean_ms=_sig(1e3 * runs["on"]["mean_step_s"]),
                             speedup=_sig(plain / casc), same_tokens=same, first_diff_at_near_tie=tie,
                             cascade_steps=runs["on"]["cascade_steps"].get(2, 0),
                             plain_graph_steps=runs["off"]["graph_steps"],
                             cascade_tuned="; ".join(f"{k}: {v}" for k, v in runs["on"]["tuned"].items()) or None))
            print(f"engine-cascade: {rows[-1]}", flush=True)
    meta = _report.environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    meta.update(model="llama-2-7b layer shapes, 8 layers, dummy weights", warm_steps=WARM, timed_steps=TIMED)
    return {"study": "engine-cascade", "meta": meta, "backends": {}, "results": rows}


def tables(report: dict, markdown: bool = False) -> str:
    rows = report["results"]
    cols = ["dtype", "requests", "system_tokens", "unique_tokens", "plain_step_ms", "cascade_step_ms", "speedup",
            "plain_mean_ms", "cascade_mean_ms",
            "same_tokens", "first_diff_at_near_tie", "cascade_steps", "plain_graph_steps"]
    fmt = _report.markdown_table if markdown else _report.format_table
    head = ("decode step of 64 requests over a shared 4,096-token system prompt: plain engine (decode CUDA "
            "graphs) vs cascade attention (cascade='on')")
    tuned = [f"{r['dtype']}: {r['cascade_tuned']}" for r in rows if r.get("cascade_tuned")]
    tail = ("\n\nLaunch configurations the autotuner chose in the cascade engine (capture and steps): "
            + " | ".join(tuned)) if tuned else ""
    return head + "\n\n" + fmt(cols, [[r.get(k) for k in cols] for r in rows]) + tail

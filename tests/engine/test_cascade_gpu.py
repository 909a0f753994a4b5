"""Cascade attention in the engine on a GPU: 64 requests sharing a 4,096-token system prompt (cached by an
earlier request) with 256 unique tokens each. The decode step with ``cascade="on"`` (eager, the shared pages
read once per layer) is at least 1.5x faster than the plain engine's (decode CUDA graphs, the prompt read
once per request), and in float32 the greedy tokens are identical (or first differ where the plain engine's
two best logprobs tie within float32 noise).

Model: Llama-2-7B's layer shapes (32 query and 32 KV heads of 128: 32 KB of float32 KV per token and layer),
8 layers, dummy weights. Plain decode reads 64 x 4,352 tokens of KV per layer (9.1 GB in float32), the
cascade 4,096 + 64 x 256 (0.7 GB).
"""
from __future__ import annotations

import gc
import time

import pytest
import torch

from pagoda.engine import SamplingParams
from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.gpu

LLAMA_2_7B_8_LAYERS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
                           num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=10000.0,
                           max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5)
SYSTEM, UNIQUE, BATCH, WARM, TIMED = 4096, 256, 64, 4, 16


def _requests():
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, 32000, (SYSTEM,), generator=g).tolist()
    return system, [system + torch.randint(3, 32000, (UNIQUE,), generator=g).tolist() for _ in range(BATCH)]


def _run(model_dir: str, dtype: str, mode: str) -> tuple[float, dict[str, list], dict[str, list], LLMEngine]:
    """Seconds per decode step of the full batch, and each request's tokens and logprobs."""
    engine = LLMEngine(EngineConfig(model_dir, load_format="dummy", dtype=dtype, max_model_len=4608,
                                    max_num_seqs=BATCH, gpu_memory_utilization=0.45, cascade=mode))
    system, prompts = _requests()
    engine.add_request("system", {"prompt_token_ids": system + [5]}, SamplingParams(max_tokens=1))
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

    while engine.stats.decode_steps < WARM:
        step()
    torch.cuda.synchronize()
    d0, t0 = engine.stats.decode_steps, time.perf_counter()
    for _ in range(TIMED):
        step()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / TIMED
    assert engine.stats.decode_steps - d0 == TIMED
    while engine.has_unfinished_requests():
        step()
    assert all(o.num_cached_tokens == SYSTEM for o in outs.values()), [o.num_cached_tokens for o in outs.values()]
    tokens = {k: o.outputs[0].token_ids for k, o in outs.items()}
    logprobs = {k: o.outputs[0].logprobs for k, o in outs.items()}
    return per_step, tokens, logprobs, engine


def _near_tie(lp: dict) -> bool:
    best = sorted((v.logprob for v in lp.values()), reverse=True)[:2]
    return len(best) == 2 and best[0] - best[1] < 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cascade_decode_faster_and_same_tokens(dtype, tmp_path):
    from pagoda.bench.engine import dummy_model_dir

    model_dir = str(dummy_model_dir(LLAMA_2_7B_8_LAYERS, "llama", tmp_path))
    results = {}
    for mode in ("off", "on"):
        per_step, tokens, logprobs, engine = _run(model_dir, dtype, mode)
        runner = engine.model_runner
        if mode == "on":
            assert runner.cascade_steps.get(2, 0) >= WARM + TIMED, runner.cascade_steps
        else:
            assert runner.cascade_steps == {} and engine.stats.graph_steps >= TIMED
        results[mode] = (per_step, tokens, logprobs)
        del engine, runner
        gc.collect()
        torch.cuda.empty_cache()
    plain, cascade = results["off"][0], results["on"][0]
    print(f"{dtype}: decode step plain {plain * 1e3:.2f} ms, cascade {cascade * 1e3:.2f} ms, {plain / cascade:.2f}x")
    assert plain >= 1.5 * cascade, (plain, cascade)
    if dtype != "float32":
        return     # bf16 roundings of two different kernels may flip near-tied tokens of a random model
    for rid, ref in results["off"][1].items():
        got = results["on"][1][rid]
        if got != ref:
            i = next(j for j, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b)
            assert _near_tie(results["off"][2][rid][i]), (rid, i, got, ref)

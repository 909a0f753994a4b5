"""Greedy decoding equals Hugging Face transformers' ``generate`` token for token (float32, CPU) for every
architecture, under every scheduling path: prompts as text and as ids, prefix caching on and off,
chunked prefill, preemption, and 64 copies of one prompt in one batch."""
from __future__ import annotations

import pytest

from pagoda.engine import LLM, SamplingParams
from tests.models.tiny import ARCHS, SLIDING_WINDOW

NEW = 6
# Shared beginnings (prefix-cache hits across requests) and lengths past Mistral's sliding window.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox jumps over the lazy dog. A paged key-value cache stores",
    "Rotary position embeddings rotate pairs of features by an angle",
    "Numbers: 0 1 2 3 4 5",
]


def _greedy(n: int = NEW) -> SamplingParams:
    # min_tokens = max_tokens masks EOS exactly as HF's min_new_tokens does, so both produce n tokens.
    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)


def _check(llm: LLM, model_dir, hf_greedy, prompts, outputs, n: int = NEW) -> None:
    tok = llm.get_tokenizer()
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else tok.encode(prompt)
        assert out.prompt_token_ids == ids
        got = out.outputs[0].token_ids
        assert got == hf_greedy(model_dir, ids, n), f"{prompt!r}"
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_hf(arch, tiny_model, hf_greedy):
    model_dir = tiny_model(arch)
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=8)
    tok = llm.get_tokenizer()
    if arch == "mistral":
        assert all(len(tok.encode(p)) > SLIDING_WINDOW for p in PROMPTS)
    outs = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
    _check(llm, model_dir, hf_greedy, PROMPTS, outs)
    # The same prompts as token ids: now served from the prefix cache (all but each last block).
    as_ids = [{"prompt_token_ids": tok.encode(p)} for p in PROMPTS]
    outs = llm.generate(as_ids, _greedy(), use_tqdm=False)
    _check(llm, model_dir, hf_greedy, as_ids, outs)
    assert all(o.num_cached_tokens > 0 for o in outs)
    assert llm.llm_engine.block_manager.hit_rate > 0


def test_generated_blocks_are_cached_for_the_next_turn(tiny_model, hf_greedy):
    """The blocks a decode fills (tokens read one step behind the device) are registered in the prefix cache:
    a next turn whose prompt is the first turn's prompt and output finds all of it but the last block, and
    its greedy tokens still equal HF's."""
    model_dir = tiny_model("qwen3")
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=8)
    first = llm.generate({"prompt_token_ids": list(range(3, 12))}, _greedy(23), use_tqdm=False)[0]
    turn = first.prompt_token_ids + first.outputs[0].token_ids          # 32 tokens: 8 blocks
    second = llm.generate({"prompt_token_ids": turn}, _greedy(), use_tqdm=False)
    # Every token but the last had its KV computed; the cache serves all full blocks a prompt may skip.
    assert second[0].num_cached_tokens == 28
    _check(llm, model_dir, hf_greedy, [{"prompt_token_ids": turn}], second)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_without_prefix_caching(arch, tiny_model, hf_greedy):
    model_dir = tiny_model(arch)
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=8, enable_prefix_caching=False)
    for _ in range(2):
        outs = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
        _check(llm, model_dir, hf_greedy, PROMPTS, outs)
        assert all(o.num_cached_tokens == 0 for o in outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_chunked_prefill(arch, tiny_model, hf_greedy):
    """A 5-token budget: every prompt is prefilled in chunks, sharing steps with other requests' decodes."""
    model_dir = tiny_model(arch)
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=5)
    outs = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
    _check(llm, model_dir, hf_greedy, PROMPTS, outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_preemption(arch, tiny_model, hf_greedy):
    """Too few pages for all requests at once: sequences are preempted and recomputed, outputs unchanged."""
    model_dir = tiny_model(arch)
    n = 10
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, num_gpu_blocks_override=16,
              enable_prefix_caching=arch in ("qwen2", "mistral"))   # recompute with and without cache hits
    outs = llm.generate(PROMPTS, _greedy(n), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    _check(llm, model_dir, hf_greedy, PROMPTS, outs, n)


def test_64_copies_in_one_batch(tiny_model, hf_greedy):
    model_dir = tiny_model("qwen3")
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=64)
    prompt = PROMPTS[2]
    outs = llm.generate([prompt] * 64, _greedy(4), use_tqdm=False)
    _check(llm, model_dir, hf_greedy, [prompt] * 64, outs, 4)

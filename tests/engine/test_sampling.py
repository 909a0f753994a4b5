"""Sampling through the engine: logprobs against HF, the filters, seeds (reproducible across runs and batch
compositions) and n > 1."""
from __future__ import annotations

import math

import pytest
import torch

from pagoda.engine import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Rotary position embeddings rotate pairs", "Numbers: 0 1 2 3"]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama3.1")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=16)


def _tokens(out, i=0):
    return out.outputs[i].token_ids


def test_logprobs_equal_hf_log_softmax(llm, model_dir):
    from transformers import AutoModelForCausalLM

    k = 5
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=5, logprobs=k), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for out in outs:
        c = out.outputs[0]
        ids = out.prompt_token_ids + c.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
        assert len(c.logprobs) == len(c.token_ids)
        for step, (token, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
            row = ref[len(out.prompt_token_ids) - 1 + step]
            top_lp, top_ids = row.topk(k)
            assert list(entry) == [token] + [t for t in top_ids.tolist() if t != token]   # sampled first
            for r, (t, v) in enumerate(zip(top_ids.tolist(), top_lp.tolist(), strict=True), start=1):
                assert entry[t].rank == r and entry[t].logprob == pytest.approx(v, abs=1e-4)
                assert entry[t].decoded_token == llm.get_tokenizer().convert_tokens_to_string(
                    [llm.get_tokenizer().convert_ids_to_tokens(t)])
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs,
                                                                                        strict=True)))


def test_no_logprobs_by_default(llm):
    c = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert c.logprobs is None and c.cumulative_logprob is None


def test_filters_that_leave_one_token_are_greedy(llm):
    """top_k=1, a tiny top_p and min_p=1 each leave only the most likely token: through the sampler, mixed in
    one batch with greedy and seeded rows, they must reproduce greedy decoding."""
    greedy = [_tokens(o) for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6),
                                               use_tqdm=False)]
    kinds = [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=1, seed=3), dict(temperature=0.0)]
    prompts = [p for p in PROMPTS for _ in kinds]
    params = [SamplingParams(temperature=kw.pop("temperature", 1.7), max_tokens=6, **kw) for _ in PROMPTS
              for kw in [dict(k) for k in kinds]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, out in enumerate(outs):
        assert _tokens(out) == greedy[i // len(kinds)], (prompts[i], kinds[i % len(kinds)])


def test_samples_stay_inside_the_filters(llm):
    """Every sampled token lies in the set its filter keeps (checked on the raw logprobs, temperature 1)."""
    n = 12
    outs = llm.generate(PROMPTS, [SamplingParams(top_k=3, max_tokens=n, logprobs=3, seed=1),
                                  SamplingParams(min_p=0.3, max_tokens=n, logprobs=1, seed=2),
                                  SamplingParams(top_p=0.5, max_tokens=n, logprobs=20, seed=3)], use_tqdm=False)
    top_k, min_p, top_p = (o.outputs[0] for o in outs)
    assert all(e[t].rank <= 3 for t, e in zip(top_k.token_ids, top_k.logprobs, strict=True))
    for t, e in zip(min_p.token_ids, min_p.logprobs, strict=True):
        best = max(v.logprob for v in e.values())
        assert e[t].logprob >= math.log(0.3) + best - 1e-5
    for t, e in zip(top_p.token_ids, top_p.logprobs, strict=True):
        above = sum(math.exp(v.logprob) for tid, v in e.items() if v.logprob > e[t].logprob)
        assert e[t].rank <= 20 and above < 0.5 + 1e-5


@pytest.mark.parametrize("rows", ["uniform", "mixed"])
def test_unseeded_batches_stay_inside_the_filters(llm, rows):
    """Unseeded rows share one draw: with every row's filters equal (passed to the sampler as numbers) and with
    them differing between rows (tensors), beside a greedy row, each token lies in its row's kept set."""
    n = 10
    if rows == "uniform":
        params = [SamplingParams(temperature=1.3, top_k=2, top_p=0.9, max_tokens=n, logprobs=2, ignore_eos=True)] * 6
    else:
        params = [SamplingParams(temperature=t, top_k=k, max_tokens=n, logprobs=4, ignore_eos=True) for t, k in
                  ((0.7, 2), (1.5, 4), (1.0, 3), (1.2, 1), (0.9, 2))] + [SamplingParams(temperature=0, max_tokens=n,
                                                                                      ignore_eos=True)]
    outs = llm.generate([PROMPTS[i % 3] for i in range(len(params))], params, use_tqdm=False)
    for out, sp in zip(outs, params, strict=True):
        c = out.outputs[0]
        assert len(c.token_ids) == n
        if sp.temperature == 0:
            continue
        assert all(e[t].rank <= sp.top_k for t, e in zip(c.token_ids, c.logprobs, strict=True)), sp


def test_seeded_sampling_is_reproducible_across_runs_and_batches(llm, model_dir):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=10)
    alone = _tokens(llm.generate(PROMPTS[0], params, use_tqdm=False)[0])
    again = _tokens(llm.generate(PROMPTS[0], params, use_tqdm=False)[0])
    assert alone == again
    # In a batch with unseeded and differently seeded requests, in another position.
    mixed = [SamplingParams(temperature=1.0, max_tokens=4), SamplingParams(temperature=0.8, seed=7, max_tokens=12),
             params, SamplingParams(temperature=0, max_tokens=3)]
    outs = llm.generate([PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[1]], mixed, use_tqdm=False)
    assert _tokens(outs[2]) == alone
    # A fresh engine (other pages, other default stream) gives the same tokens.
    other = LLM(str(model_dir), block_size=8, max_model_len=64, seed=99, enable_prefix_caching=False)
    assert _tokens(other.generate(PROMPTS[0], params, use_tqdm=False)[0]) == alone
    different = _tokens(llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.95, seed=4321,
                                                                max_tokens=10), use_tqdm=False)[0])
    assert different != alone


def test_unseeded_sampling_follows_the_engine_seed(model_dir):
    params = SamplingParams(temperature=1.0, max_tokens=8)
    a = LLM(str(model_dir), block_size=4, max_model_len=64, seed=5).generate(PROMPTS, params, use_tqdm=False)
    b = LLM(str(model_dir), block_size=4, max_model_len=64, seed=5).generate(PROMPTS, params, use_tqdm=False)
    assert [_tokens(o) for o in a] == [_tokens(o) for o in b]


def test_n_completions(llm):
    greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, n=3), use_tqdm=False)[0]
    assert [c.index for c in greedy.outputs] == [0, 1, 2]
    assert _tokens(greedy, 0) == _tokens(greedy, 1) == _tokens(greedy, 2)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=10), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    for i in range(3):   # completion i draws from seed + i
        single = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=8, seed=10 + i), use_tqdm=False)
        assert _tokens(out, i) == _tokens(single[0])
    assert all(c.finish_reason == "length" for c in out.outputs) and out.finished


def test_logits_processor_hook(llm):
    """A processor added to the model runner edits the logits before sampling; logprobs stay raw."""
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=1)
    first = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    banned = first.token_ids[0]

    def ban(logits, seqs):
        logits[:, banned] = float("-inf")
        return logits

    runner = llm.llm_engine.model_runner
    runner.logits_processors.append(ban)
    try:
        c = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    finally:
        runner.logits_processors.remove(ban)
    assert c.token_ids[0] != banned and c.logprobs[0][c.token_ids[0]].rank == 2
    assert c.logprobs[0][banned].logprob == pytest.approx(first.logprobs[0][banned].logprob)

"""Built-in logits processing through the engine: greedy tokens equal HF ``generate`` with the matching HF
logits processors (repetition penalty, sequence bias, allowed tokens, bad words, min new tokens), and, where HF
has no equivalent (presence / frequency penalties), a float64 step-by-step replay of vLLM's formulas on HF's
logits. Also: a batch mixing all of it, preemption, bad input refused at add_request.

Where vLLM (and pagoda) and HF differ: bad words match their prefix against the output only in vLLM, against
prompt + output in HF (`test_bad_word_prefix_in_prompt_is_not_matched`); min_tokens forbids EOS and
stop_token_ids in vLLM, only the given ``eos_token_id`` in HF; a bias is added to the logits before the
penalties in vLLM, HF's order is the processors' list order (the tests list them in vLLM's order).
"""
from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.logits import bad_words_token_ids

PROMPTS = ["The quick brown fox jumps", "Sampling draws the next token", "def add(a, b):"]
N = 12


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=8, num_gpu_blocks_override=96)


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _ids(llm, prompt: str) -> list[int]:
    return llm.get_tokenizer().encode(prompt)


def _eos(llm) -> list[int]:
    return sorted(llm.llm_engine.eos_token_ids)


def _hf_generate(hf, prompt_ids: list[int], processors: list, n: int = N) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          logits_processor=LogitsProcessorList(processors), pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def _hf_processors(llm, prompt_ids, *, allowed=None, bad=None, bias=None, min_new=N, rep=None) -> list:
    """HF's processors in vLLM's order: allowed tokens, bad words, bias, min tokens, repetition penalty."""
    procs = []
    if allowed is not None:
        procs.append(PrefixConstrainedLogitsProcessor(lambda _b, _ids: list(allowed), num_beams=1))
    if bad:
        procs.append(NoBadWordsLogitsProcessor(bad))
    if bias:
        procs.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()]))
    if min_new:
        procs.append(MinNewTokensLengthLogitsProcessor(len(prompt_ids), min_new, _eos(llm)))
    if rep is not None:
        procs.append(RepetitionPenaltyLogitsProcessor(rep))
    return procs


def _gen(llm, prompts, params) -> list[list[int]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _plain(llm, prompt) -> list[int]:
    return _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=N, min_tokens=N))[0]


@pytest.mark.parametrize("penalty", [1.5, 0.6])
def test_repetition_penalty_equals_hf(llm, hf, penalty):
    changed = False
    for prompt in PROMPTS:
        ids = _ids(llm, prompt)
        got = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=N, min_tokens=N,
                                                 repetition_penalty=penalty))[0]
        assert got == _hf_generate(hf, ids, _hf_processors(llm, ids, rep=penalty))
        changed |= got != _plain(llm, prompt)
    assert changed, "the penalty never changed a token: the test would not see it ignored"


def test_logit_bias_and_allowed_tokens_equal_hf(llm, hf):
    prompt = PROMPTS[0]
    ids = _ids(llm, prompt)
    plain = _plain(llm, prompt)
    bias = {plain[0]: -30.0, 7: 4.0, 11: 2.5}
    got = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=N, min_tokens=N, logit_bias=bias))[0]
    assert got == _hf_generate(hf, ids, _hf_processors(llm, ids, bias=bias)) and got != plain
    allowed = [5, 9, 13, 17, 21, 40, 41, 42, plain[3]]
    got = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=N, min_tokens=N, allowed_token_ids=allowed))[0]
    assert set(got) <= set(allowed)
    assert got == _hf_generate(hf, ids, _hf_processors(llm, ids, allowed=allowed))


def test_bad_words_equal_hf(llm, hf):
    """A word taken from the greedy output (two tokens and one token) is never generated, as HF's
    NoBadWordsLogitsProcessor does with the same token ids."""
    tok = llm.get_tokenizer()
    vocab = llm.llm_engine.vocab_size
    bit = 0
    for prompt in PROMPTS:
        ids = _ids(llm, prompt)
        plain = _plain(llm, prompt)
        for k in range(1, N - 2):
            word = tok.decode(plain[k:k + 2])
            if not word.strip() or "\ufffd" in word:
                continue
            bad = bad_words_token_ids([word], tok, vocab)
            got = _gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=N, min_tokens=N, bad_words=[word]))[0]
            assert got == _hf_generate(hf, ids, _hf_processors(llm, ids, bad=bad)), (prompt, word, bad)
            for w in bad:
                assert not any(got[i:i + len(w)] == w for i in range(len(got) - len(w) + 1))
            bit += got != plain
            break
    assert bit, "no bad word changed an output"


def test_bad_word_prefix_in_prompt_is_not_matched(llm):
    """vLLM matches a bad word's prefix against the output only: a word whose first token ends the prompt
    does not ban its second token at the first step (HF would)."""
    prompt_ids = _ids(llm, PROMPTS[0])
    plain = _plain(llm, PROMPTS[0])
    tok = llm.get_tokenizer()
    word = tok.decode([prompt_ids[-1], plain[0]])
    bad = bad_words_token_ids([word], tok, llm.llm_engine.vocab_size)
    if [prompt_ids[-1], plain[0]] not in bad:
        pytest.skip("the word does not tokenize back to the same two tokens")
    got = _gen(llm, [{"prompt_token_ids": prompt_ids}],
               SamplingParams(temperature=0, max_tokens=2, min_tokens=2, bad_words=[word]))[0]
    assert got[0] == plain[0]


def _vllm_reference(hf, prompt_ids: list[int], params: SamplingParams, eos: list[int], n: int) -> list[int]:
    """Greedy decoding on HF's logits with vLLM's processing replayed in float64, step by step."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt_ids + out])).logits[0, -1].double()
        if params.allowed_token_ids is not None:
            keep = torch.full_like(logits, float("-inf"))
            keep[params.allowed_token_ids] = 0
            logits = logits + keep
        for t, b in (params.logit_bias or {}).items():
            logits[t] += b
        if len(out) < params.min_tokens:
            logits[sorted(set(eos) | set(params.stop_token_ids))] = float("-inf")
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=logits.numel()).double()
        seen = counts > 0
        seen[prompt_ids] = True
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).double()
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 1.2), (-0.5, 2.0)])
def test_presence_frequency_equal_float64_reference(llm, hf, presence, frequency):
    changed = False
    for prompt in PROMPTS[:2]:
        ids = _ids(llm, prompt)
        params = SamplingParams(temperature=0, max_tokens=N, min_tokens=N, presence_penalty=presence,
                                frequency_penalty=frequency)
        got = _gen(llm, [prompt], params)[0]
        assert got == _vllm_reference(hf, ids, params, _eos(llm), N)
        changed |= got != _plain(llm, prompt)
    assert changed


def test_mixed_batch_with_preemption(model_dir, hf, monkeypatch):
    """Requests with different processing (and none) in one batch, on a cache small enough to preempt: each
    equals its own float64 reference (state follows its request through rows, slots and recomputes)."""
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=6, num_gpu_blocks_override=14)
    sched = llm.llm_engine.scheduler
    preempted = []
    real = sched.preempt
    monkeypatch.setattr(sched, "preempt", lambda seq, *a, **k: (preempted.append(seq), real(seq, *a, **k))[1])
    tok = llm.get_tokenizer()
    plain = _plain(llm, PROMPTS[0])
    cases = [
        dict(repetition_penalty=1.4, frequency_penalty=0.3),
        dict(),
        dict(presence_penalty=0.9, logit_bias={plain[2]: -50.0, 3: 1.5}),
        dict(allowed_token_ids=list(range(30, 90)), repetition_penalty=0.8),
        dict(min_tokens=0, max_tokens=N, stop_token_ids=[plain[4]]),
        dict(bad_words=[tok.decode(plain[5:6])], frequency_penalty=-0.5),
    ]
    prompts, params = [], []
    for i, extra in enumerate(cases):
        kw = dict(temperature=0, max_tokens=N, min_tokens=N)
        kw.update(extra)
        prompts.append(PROMPTS[i % len(PROMPTS)])
        params.append(SamplingParams(**kw))
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, p, o in zip(prompts, params, outs, strict=True):
        ids = _ids(llm, prompt)
        ref = _vllm_reference_with_bad_words(hf, ids, p, _eos(llm), N, tok, llm.llm_engine.vocab_size)
        got = o.outputs[0].token_ids
        assert got == ref[:len(got)], (p, got, ref)
        if p.stop_token_ids and len(got) < N:
            assert got[-1] in p.stop_token_ids
    assert preempted, "the cache never ran short: the test would not see state kept across a preemption"


def _vllm_reference_with_bad_words(hf, prompt_ids, params, eos, n, tok, vocab):
    if not params.bad_words:
        return _vllm_reference(hf, prompt_ids, params, eos, n)
    words = bad_words_token_ids(params.bad_words, tok, vocab)
    assert all(len(w) == 1 for w in words)
    banned = {w[0] for w in words}
    allowed = [t for t in range(vocab) if t not in banned]
    p = SamplingParams(**{**{k: getattr(params, k) for k in ("temperature", "max_tokens", "min_tokens",
                                                             "presence_penalty", "frequency_penalty",
                                                             "repetition_penalty")}, "allowed_token_ids": allowed})
    return _vllm_reference(hf, prompt_ids, p, eos, n)


@pytest.mark.parametrize("field,value,match", [
    ("logit_bias", {10**6: 1.0}, "logit_bias"),
    ("allowed_token_ids", [0, 10**6], "allowed_token_ids"),
    ("stop_token_ids", [10**6], "stop_token_ids"),
])
def test_out_of_vocabulary_ids_refused_at_add_request(llm, field, value, match):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", PROMPTS[0], SamplingParams(**{field: value}))
    assert not engine.has_unfinished_requests()
    assert _plain(llm, PROMPTS[0])       # the engine keeps serving


def test_sampling_params_validation():
    for field, value in [("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0.0),
                         ("allowed_token_ids", []), ("bad_words", [""])]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    for field, value in [("logit_bias", [1]), ("logit_bias", {"x": 1.0}), ("allowed_token_ids", [1.5]),
                         ("bad_words", [3]), ("repetition_penalty", "2"), ("logits_processors", [3])]:
        with pytest.raises(TypeError, match=field):
            SamplingParams(**{field: value})
    assert SamplingParams(logit_bias={"5": 1}).logit_bias == {5: 1.0}      # OpenAI's JSON keys
    assert SamplingParams(bad_words=["a", "a", "b"]).bad_words == ["a", "b"]


def test_bf16_logits_reach_the_sampler_uncopied_and_processors_in_float32(model_dir):
    """In bf16 the LM head's logits stay bf16 up to the sampler and the logprobs (each reads them in float32);
    a step with an active processor works on a float32 copy. A processor that changes nothing (a zero bias)
    then gives the same tokens and logprobs as no processor, and the raw logits keep their dtype."""
    llm = LLM(str(model_dir), dtype="bfloat16", block_size=4, max_model_len=64, max_num_seqs=8)
    runner = llm.llm_engine.model_runner
    hidden = torch.randn(2, runner.model.lm_head.weight.shape[1], dtype=torch.bfloat16)
    assert runner.model.compute_logits(hidden, float32=False).dtype == torch.bfloat16
    assert runner.model.compute_logits(hidden).dtype == torch.float32
    seen = []
    apply = runner.logits_pipeline.builtin.apply

    def spy(logits, row_slots):
        seen.append(logits.dtype)
        return apply(logits, row_slots)

    runner.logits_pipeline.builtin.apply = spy
    plain = SamplingParams(temperature=0, max_tokens=N, logprobs=3, ignore_eos=True)
    zero_bias = SamplingParams(temperature=0, max_tokens=N, logprobs=3, ignore_eos=True, logit_bias={5: 0.0})
    a = llm.generate(PROMPTS, plain, use_tqdm=False)
    assert not seen
    b = llm.generate(PROMPTS, zero_bias, use_tqdm=False)
    assert seen and set(seen) == {torch.float32}
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for ex, ey in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, strict=True):
            assert {t: v.logprob for t, v in ex.items()} == {t: v.logprob for t, v in ey.items()}

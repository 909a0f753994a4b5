"""Requests through the engine: stop strings, stop tokens, EOS, min/max tokens, output kinds, abort, bad
input (the engine keeps serving), chat, the progress bar and logging."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from pagoda.engine import LLM, LLMEngine, SamplingParams
from pagoda.engine.sampling_params import RequestOutputKind

PROMPT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), block_size=4, max_model_len=48, max_num_seqs=8, num_gpu_blocks_override=64)


@pytest.fixture(scope="module")
def greedy(llm):
    """The greedy completion of PROMPT: 16 tokens, EOS masked (the reference the stop tests cut)."""
    return llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16, min_tokens=16), use_tqdm=False)[0]


def _gen(llm, **kw):
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 16)
    return llm.generate(PROMPT, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


def _stop_string(text: str) -> tuple[str, int]:
    """A 2-character piece of ``text`` (from its middle, first occurrence, no replacement characters)."""
    for i in range(len(text) // 3, len(text) - 2):
        s = text[i:i + 2]
        if "\ufffd" not in s and text.find(s) == i:
            return s, i
    raise AssertionError(f"no usable stop string in {text!r}")


def test_max_tokens(greedy, llm):
    c = _gen(llm, max_tokens=5, min_tokens=5)
    assert c.token_ids == greedy.outputs[0].token_ids[:5] and c.finish_reason == "length" and c.stop_reason is None


def test_stop_string(greedy, llm):
    full = greedy.outputs[0]
    stop, i = _stop_string(full.text)
    c = _gen(llm, stop=[stop], min_tokens=0)
    assert c.text == full.text[:i] and c.finish_reason == "stop" and c.stop_reason == stop
    assert c.token_ids == full.token_ids[:len(c.token_ids)]
    c = _gen(llm, stop=["never there", stop], include_stop_str_in_output=True)
    assert c.text == full.text[:i + len(stop)] and c.stop_reason == stop


def test_stop_string_never_streams(greedy, model_dir, llm):
    """Cumulative outputs hold the text back so a stop string is never seen, even in part; deltas add up."""
    full = greedy.outputs[0]
    stop, i = _stop_string(full.text)
    engine = llm.llm_engine
    engine.add_request("cum", PROMPT, SamplingParams(temperature=0, max_tokens=16, stop=[stop]))
    engine.add_request("delta", PROMPT, SamplingParams(temperature=0, max_tokens=16, stop=[stop],
                                                       output_kind=RequestOutputKind.DELTA))
    texts, deltas, finals = [], [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "cum":
                texts.append(out.outputs[0].text)
            else:
                deltas.append(out.outputs[0].text)
            if out.finished:
                finals[out.request_id] = out.outputs[0]
    assert finals["cum"].text == "".join(deltas) == full.text[:i]
    assert all(stop not in t and stop[0] not in t[i:] for t in texts)
    assert all(texts[j + 1].startswith(texts[j]) for j in range(len(texts) - 1))


def test_stop_token_ids(greedy, llm):
    tokens = greedy.outputs[0].token_ids
    stop_id = tokens[3]
    first = tokens.index(stop_id)
    c = _gen(llm, stop_token_ids=[stop_id])
    assert c.token_ids == tokens[:first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_id
    tok = llm.get_tokenizer()
    assert c.text == tok.decode(tokens[:first])          # the stop token's text is left out
    c = _gen(llm, stop_token_ids=[stop_id], max_tokens=first + 1)
    assert c.finish_reason == "stop" and c.stop_reason == stop_id   # a stop token on the last allowed step


def test_eos(greedy, llm):
    """EOS ends a completion (stop_reason None) unless ignore_eos; eos ids come from the engine."""
    engine = llm.llm_engine
    tokens = greedy.outputs[0].token_ids
    saved = engine.eos_token_ids
    engine.eos_token_ids = frozenset({tokens[2]})
    try:
        c = _gen(llm)
        first = tokens.index(tokens[2])
        assert c.token_ids == tokens[:first + 1] and c.finish_reason == "stop" and c.stop_reason is None
        assert _gen(llm, ignore_eos=True).token_ids == tokens
    finally:
        engine.eos_token_ids = saved


def test_min_tokens_equals_hf_min_new_tokens(greedy, llm, model_dir):
    """min_tokens masks the stop tokens as HF's min_new_tokens masks EOS: same tokens, same stop."""
    import torch
    from transformers import AutoModelForCausalLM

    tokens = greedy.outputs[0].token_ids
    stop_id = tokens[1]
    c = _gen(llm, stop_token_ids=[stop_id], min_tokens=5, max_tokens=12)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([greedy.prompt_token_ids])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=5,
                          eos_token_id=stop_id, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert c.token_ids == ref
    assert stop_id not in c.token_ids[:5] and c.token_ids[1] != stop_id
    assert (c.finish_reason == "stop") == (c.token_ids[-1] == stop_id)


def test_abort_midway(greedy, llm):
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    for rid in ("a", "b", "c"):
        engine.add_request(rid, PROMPT, params)
    seen = set()
    for _ in range(3):
        seen |= {o.request_id for o in engine.step()}
    engine.abort_request(["b", "unknown"])
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks   # a and c still hold pages
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "b"
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
    assert finals == {"a": greedy.outputs[0].token_ids, "c": greedy.outputs[0].token_ids}
    engine.abort_request("a")   # finished: ignored


@pytest.mark.parametrize("prompt, params, match", [
    ("", SamplingParams(), "prompt is empty"),
    ({"prompt_token_ids": []}, SamplingParams(), "prompt_token_ids is empty"),
    ({"prompt_token_ids": [1, -1]}, SamplingParams(), "prompt_token_ids"),
    ({"prompt_token_ids": [1, 10 ** 6]}, SamplingParams(), "prompt_token_ids"),
    ({"prompt_token_ids": [1] * 48}, SamplingParams(), "max_model_len"),
    ({"prompt_token_ids": [1] * 40}, SamplingParams(max_tokens=9), "max_tokens"),
    ({"prompt": "a", "extra": 1}, SamplingParams(), "prompt"),
    (PROMPT, SamplingParams(logprobs=21), "logprobs"),
])
def test_bad_input_is_refused_and_the_engine_keeps_serving(greedy, llm, prompt, params, match):
    engine = llm.llm_engine
    engine.add_request("good", PROMPT, SamplingParams(temperature=0, max_tokens=16, min_tokens=16))
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, params)
    with pytest.raises(ValueError, match=match):     # the same through LLM.generate, with a good prompt before
        llm.generate([PROMPT, prompt], params, use_tqdm=False)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(finals) == ["good"] and finals["good"].outputs[0].token_ids == greedy.outputs[0].token_ids


def test_bad_request_types(llm):
    engine = llm.llm_engine
    with pytest.raises(TypeError, match="prompt"):
        engine.add_request("x", 5, SamplingParams())
    with pytest.raises(TypeError, match="params"):
        engine.add_request("x", PROMPT, {"temperature": 0})
    for ids in ([1.0], [1, True], [2, 3, "4"], [np.int64(1)]):
        with pytest.raises(TypeError, match="prompt_token_ids"):
            engine.add_request("x", {"prompt_token_ids": ids}, SamplingParams())
    engine.add_request("x", PROMPT, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("x", PROMPT, SamplingParams())
    engine.abort_request("x")
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([PROMPT, PROMPT], [SamplingParams()], use_tqdm=False)


def test_request_that_can_never_fit(model_dir):
    small = LLM(str(model_dir), block_size=4, max_model_len=48, num_gpu_blocks_override=6)
    with pytest.raises(ValueError, match="KV blocks"):
        small.generate(PROMPT, SamplingParams(max_tokens=16), use_tqdm=False)
    out = small.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)[0]   # still serving
    assert len(out.outputs[0].token_ids) <= 2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(tensor_parallel_size=0), ValueError, "tensor_parallel_size"),
    (dict(dtype="int8"), ValueError, "dtype"),
    (dict(block_size=12), ValueError, "block_size"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(max_model_len=10 ** 6), ValueError, "max_model_len"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs"),
    (dict(max_num_batched_tokens=8, max_num_seqs=16), ValueError, "max_num_batched_tokens"),
    (dict(enable_chunked_prefill=False, max_num_batched_tokens=64, max_num_seqs=8), ValueError, "chunked"),
    (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization"),
    (dict(load_format="pt"), ValueError, "load_format"),
    (dict(num_gpu_blocks_override=0), ValueError, "num_gpu_blocks_override"),
    (dict(enable_prefix_caching=1), TypeError, "enable_prefix_caching"),
    (dict(seed="0"), TypeError, "seed"),
])
def test_bad_engine_settings(model_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        LLM(str(model_dir), **kwargs)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_prompt_forms(greedy, llm):
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    ids = greedy.prompt_token_ids
    outs = llm.generate([PROMPT, {"prompt": PROMPT}, {"prompt_token_ids": ids}], params, use_tqdm=False)
    assert [o.prompt for o in outs] == [PROMPT, PROMPT, None]
    assert all(o.prompt_token_ids == ids and o.outputs[0].token_ids == greedy.outputs[0].token_ids for o in outs)
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)


def test_chat(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    params = SamplingParams(temperature=0, max_tokens=6)
    out = llm.chat(messages, params, use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt == text and text.endswith("<|assistant|>")
    ref = llm.generate({"prompt_token_ids": tok.encode(text, add_special_tokens=False)}, params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    two = llm.chat([messages, messages[1:]], params, use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == ref.outputs[0].token_ids


def test_progress_bar_and_debug_log(llm, capsys, caplog):
    with caplog.at_level(logging.DEBUG, logger="pagoda.engine"):
        llm.generate([PROMPT, PROMPT], SamplingParams(max_tokens=3), use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "est. speed input:" in err and "output:" in err
    assert any("KV usage" in r.getMessage() and "prefix-cache hit rate" in r.getMessage() for r in caplog.records)


def test_engine_from_kwargs_and_cli(model_dir, capsys):
    from pagoda.cli import main

    engine = LLMEngine.from_kwargs(str(model_dir), block_size=4, max_model_len=48)
    assert engine.get_tokenizer() is not None and not engine.has_unfinished_requests()
    assert main(["generate", str(model_dir), "--prompt", PROMPT, "--prompt", "Numbers", "--max-tokens", "3",
                 "--temperature", "0", "--max-model-len", "48"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== prompt:") == 2 and "finish_reason=length" in out
    with pytest.raises(SystemExit, match="top_p"):
        main(["generate", str(model_dir), "--prompt", "x", "--top-p", "2"])

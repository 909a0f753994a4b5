"""The real server (tiny random-weight Qwen3 on the CPU) through the official ``openai`` client: completions and
chat, streaming and not, n=2, stop strings, seeds, logprobs and usage, against Hugging Face transformers."""
import pytest
import torch

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

PROMPT = "The quick brown fox jumps over the lazy dog."
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café 中文: what is paging?"}]
MODEL = "tiny-qwen3"


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(live_server):
    return transformers.AutoModelForCausalLM.from_pretrained(live_server.model_dir, attn_implementation="eager").eval()


@torch.no_grad()
def hf_greedy(hf, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens (EOS ignored) and the float32 log-softmax at each step: the oracle."""
    ids, out, logps = list(ids), [], []
    for _ in range(n):
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].double(), -1)
        tok = int(logp.argmax())
        out.append(tok)
        logps.append(logp)
        ids.append(tok)
    return out, logps


def _chat_ids(tok) -> list[int]:
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def test_completion_greedy_equals_hf_streaming_and_not(live_server, client, hf):
    tok = live_server.tokenizer
    ids = tok.encode(PROMPT)
    want, _ = hf_greedy(hf, ids, 10)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 10, len(ids) + 10)

    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id}
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 10 and last.usage.prompt_tokens == len(ids)
    assert "".join(c.choices[0].text for c in body) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    # prompt given as token ids: the same tokens
    r2 = client.completions.create(**{**kw, "prompt": ids})
    assert r2.choices[0].text == r.choices[0].text
    live_server.assert_idle_and_free()


def test_chat_uses_the_template_streaming_and_not(live_server, client, hf):
    tok = live_server.tokenizer
    ids = _chat_ids(tok)
    want, _ = hf_greedy(hf, ids, 8)
    kw = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert content == r.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    # the deprecated max_tokens works the same
    r2 = client.chat.completions.create(**{**kw, "max_completion_tokens": None, "max_tokens": 8})
    assert r2.choices[0].message.content == r.choices[0].message.content
    live_server.assert_idle_and_free()


def test_n2_and_seeds_reproducible(live_server, client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.5, n=2, seed=1234,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 24
    # Streamed: the same texts, chunks of both choices interleaved by index.
    texts = ["", ""]
    for c in client.completions.create(**kw, stream=True):
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == [c.text for c in a.choices]
    other = [client.completions.create(**{**kw, "seed": s}).choices[0].text for s in (1, 2, 3)]
    assert len(set(other + [a.choices[0].text])) > 1, "seeds do not change the draws"
    live_server.assert_idle_and_free()


def test_stop_strings(live_server, client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    # a 2-character stop string whose first occurrence is in the middle of the text
    k = next(k for k in range(3, len(full) - 2) if full.find(full[k:k + 2]) == k and full[k:k + 2].strip())
    stop = full[k:k + 2]
    r = client.completions.create(**kw, stop=[stop, "never-there"])
    assert r.choices[0].text == full[:k]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True))
    assert streamed == full[:k]                      # never leaks, even partially
    kept = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}},
                                     stop=stop)
    assert kept.choices[0].text == full[:k + 2]
    live_server.assert_idle_and_free()


def test_logprobs_equal_hf(live_server, client, hf):
    tok = live_server.tokenizer
    ids = tok.encode(PROMPT)
    want, logps = hf_greedy(hf, ids, 5)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.tokens == [tok.convert_tokens_to_string([tok.convert_ids_to_tokens(t)]) for t in want]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for i in range(5):
        assert lp.token_logprobs[i] == pytest.approx(float(logps[i][want[i]]), abs=1e-3)
        top = torch.topk(logps[i], 3).values.tolist()
        # keyed by token text: tokens that decode alike (partial UTF-8 bytes) share one key, as in OpenAI's format
        got = lp.top_logprobs[i]
        assert 1 <= len(got) <= 3 and max(got.values()) == pytest.approx(top[0], abs=1e-3)
        assert all(min(abs(v - t) for t in top) < 1e-3 for v in got.values())

    chat_ids = _chat_ids(tok)
    cwant, clogps = hf_greedy(hf, chat_ids, 4)
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4
    for i, entry in enumerate(content):
        assert entry.logprob == pytest.approx(float(clogps[i][cwant[i]]), abs=1e-3)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    live_server.assert_idle_and_free()


def test_batched_prompts_models_health_metrics(live_server, client):
    import httpx

    prompts = [PROMPT, "Rotary position embeddings", "Sampling draws"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == list(range(6))
    for i, p in enumerate(prompts):      # each prompt's choices equal the prompt sent alone (greedy: n copies)
        alone = client.completions.create(model=MODEL, prompt=p, max_tokens=3, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == alone
    assert r.usage.completion_tokens == 18

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(live_server.url + "/health").status_code == 200
    text = httpx.get(live_server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['pagoda:generation_tokens_total{model_name="tiny-qwen3"}'] >= 18
    assert values['pagoda:prompt_tokens_total{model_name="tiny-qwen3"}'] > 0
    assert values['pagoda:time_to_first_token_seconds_count{model_name="tiny-qwen3"}'] >= 3
    assert values['pagoda:inter_token_latency_seconds_count{model_name="tiny-qwen3"}'] > 0
    assert values['pagoda:num_requests_running{model_name="tiny-qwen3"}'] == 0
    assert 0 < values['pagoda:prefix_cache_hit_rate{model_name="tiny-qwen3"}'] <= 1   # the same prompts again
    from pagoda.bench.serve import engine_counters
    steps = engine_counters(text)
    assert steps[("steps", "prefill")] >= 1 and steps[("steps", "decode")] >= 1
    assert steps[("host_s", "decode")] > 0 and steps[("wait_s", "prefill")] >= 0
    live_server.assert_idle_and_free()

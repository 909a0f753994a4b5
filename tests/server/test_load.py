"""200 concurrent streaming clients on the real server: every request completes with its own tokens (each equals
the same request run by a separate offline engine), nothing lost or mixed; then the same with 20% of the
clients leaving midway: their requests are aborted at once, every KV page comes back, the server stays healthy."""
import asyncio
import random

import httpx
import pytest

openai = pytest.importorskip("openai")

NUM_CLIENTS = 200
MODEL = "tiny-qwen3"


def _requests(seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per client: distinct random prompts of 4..12 ordinary tokens."""
    rng = random.Random(seed)
    return [([rng.randrange(10, 380) for _ in range(rng.randint(4, 12))], 2 + i % 5) for i in range(NUM_CLIENTS)]


@pytest.fixture(scope="module")
def workload(live_server):
    """The clients' requests and, for each, the text a separate offline engine gives it."""
    reqs = _requests(seed=1)
    return reqs, _offline(live_server.model_dir, reqs)


def _offline(model_dir: str, reqs: list[tuple[list[int], int]]) -> list[str]:
    """The oracle: the same greedy requests through a separate engine, no HTTP."""
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.engine.sampling_params import RequestOutputKind, SamplingParams

    engine = LLMEngine.from_kwargs(model_dir, max_num_seqs=256)
    for i, (ids, n) in enumerate(reqs):
        engine.add_request(str(i), {"prompt_token_ids": ids},
                           SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                          output_kind=RequestOutputKind.FINAL_ONLY))
    texts = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                texts[out.request_id] = out.outputs[0].text
    return [texts[str(i)] for i in range(len(reqs))]


async def _client(client, ids: list[int], max_tokens: int, leave_after: int | None) -> dict:
    stream = await client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    text, usage, finish, chunks = "", None, None, 0
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
            chunks += 1
        if leave_after is not None and chunks >= leave_after:
            await stream.close()           # the client goes away mid-stream
            return {"left": True}
    return {"text": text, "usage": usage, "finish": finish, "id": chunk.id}


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'pagoda:{name}{{model_name="{MODEL}"}} '):
            return float(line.split(" ")[1])
    raise KeyError(name)


async def _run_clients(url: str, reqs, leave: set[int], leave_max_tokens: int) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=NUM_CLIENTS + 8),
                                                              timeout=120))
    try:
        return await asyncio.gather(*[
            _client(client, ids, leave_max_tokens if i in leave else n, 1 if i in leave else None)
            for i, (ids, n) in enumerate(reqs)])
    finally:
        await client.close()


@pytest.mark.parametrize("leave_fraction", [0.0, 0.2])
def test_200_concurrent_streaming_clients(live_server, workload, leave_fraction):
    reqs, oracle = workload
    rng = random.Random(7)
    leave = set(rng.sample(range(NUM_CLIENTS), int(leave_fraction * NUM_CLIENTS)))
    leave_max_tokens = 48
    generated_before = _metric(live_server.url, "generation_tokens_total")

    results = asyncio.run(_run_clients(live_server.url, reqs, leave, leave_max_tokens))

    expected = [want for i, want in enumerate(oracle) if i not in leave]
    stayed = [(i, res) for i, res in enumerate(results) if i not in leave]
    assert len({res["id"] for _, res in stayed}) == len(stayed)             # one engine request each
    for (i, res), want in zip(stayed, expected, strict=True):
        ids, n = reqs[i]
        assert res["text"] == want, f"client {i}: got another request's tokens or lost some"
        assert res["finish"] == "length"
        assert (res["usage"].prompt_tokens, res["usage"].completion_tokens) == (len(ids), n)
    assert all(results[i] == {"left": True} for i in leave)

    live_server.assert_idle_and_free()
    assert httpx.get(live_server.url + "/health").status_code == 200
    generated = _metric(live_server.url, "generation_tokens_total") - generated_before
    kept = sum(reqs[i][1] for i, _ in stayed)
    # The clients that left were aborted within a step or two of leaving, not run to max_tokens.
    assert kept <= generated <= kept + len(leave) * leave_max_tokens // 4
    assert _metric(live_server.url, "num_requests_running") == 0

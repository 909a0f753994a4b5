"""Bad requests get 400 with OpenAI's error body naming the field, a wrong API key 401; the server keeps serving."""
import httpx
import pytest

from tests.server.fake_engine import FakeEngine
from tests.server.helpers import running_server

OK = {"model": "tiny-qwen3", "prompt": "hello", "max_tokens": 2}
CHAT = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# (route, body, param named in the error, code)
CASES = [
    ("completions", {**OK, "model": "gpt-9"}, "model", "model_not_found"),
    ("completions", {"max_tokens": 2}, "prompt", "missing_required_parameter"),
    ("completions", {**OK, "max_tokens": "many"}, "max_tokens", "invalid_value"),
    ("completions", {**OK, "prompt": 7}, "prompt", "invalid_value"),
    ("completions", {**OK, "n": 0}, "n", "invalid_value"),
    ("completions", {**OK, "temperature": -1.0}, "temperature", "invalid_value"),
    ("completions", {**OK, "top_p": 2.0}, "top_p", "invalid_value"),
    ("completions", {**OK, "prompt": "x " * 300}, "prompt", "context_length_exceeded"),
    ("completions", {**OK, "max_tokens": 400}, "max_tokens", "context_length_exceeded"),
    ("completions", {**OK, "prompt": [1, 2, 100000]}, "prompt", "invalid_value"),
    ("completions", {**OK, "prompt": [1, -1]}, "prompt", "invalid_value"),
    ("completions", {**OK, "prompt": []}, "prompt", "invalid_value"),
    ("completions", {**OK, "stop_token_ids": [999999]}, "stop_token_ids", "invalid_value"),
    ("completions", {**OK, "logit_bias": {"99999999": 10}}, "logit_bias", "invalid_value"),
    ("completions", {**OK, "logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
    ("completions", {**OK, "presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ("completions", {**OK, "frequency_penalty": -3.0}, "frequency_penalty", "invalid_value"),
    ("completions", {**OK, "repetition_penalty": 0.0}, "repetition_penalty", "invalid_value"),
    ("completions", {**OK, "logprobs": 21}, "logprobs", "invalid_value"),
    ("completions", {**OK, "min_tokens": 5}, "min_tokens", "invalid_value"),
    ("chat/completions", {**CHAT, "messages": []}, "messages", "invalid_value"),
    ("chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, "messages.0.role",
     "missing_required_parameter"),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ("chat/completions", {**CHAT, "logprobs": "yes please"}, "logprobs", "invalid_value"),
    ("chat/completions", {**CHAT, "max_completion_tokens": 1000}, "max_completion_tokens", "context_length_exceeded"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "unsupported_parameter"),
]


def _check_error(r: httpx.Response, status: int, param, code) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"] == ("invalid_request_error" if status == 400 else "authentication_error")
    assert (err["param"], err["code"]) == (param, code), err


def test_bad_requests_get_400_naming_the_field(live_server):
    with httpx.Client(base_url=live_server.url + "/v1", timeout=30) as c:
        for route, body, param, code in CASES:
            _check_error(c.post(f"/{route}", json=body), 400, param, code)
        for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
            _check_error(c.post("/completions", content=raw, headers={"content-type": "application/json"}), 400,
                         None, "invalid_json")
        ok = c.post("/completions", json={**OK, "presence_penalty": 0.5, "frequency_penalty": 0.1,
                                          "repetition_penalty": 1.1, "logit_bias": {"5": -100},
                                          "response_format": {"type": "text"}, "top_k": -1, "extra_field": 1})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] >= 1
        assert c.post("/chat/completions", json=CHAT).status_code == 200
    live_server.assert_idle_and_free()


def test_api_key_and_engine_refusal():
    engine = FakeEngine()
    with running_server(engine, served_model_name="m", api_key="sekrit") as (url, _):
        body = {"prompt": "abc", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            _check_error(httpx.post(url + "/v1/completions", json=body, headers=headers), 401, None,
                         "invalid_api_key")
        assert httpx.get(url + "/v1/models").status_code == 401
        good = {"Authorization": "Bearer sekrit"}
        assert httpx.post(url + "/v1/completions", json=body, headers=good).status_code == 200
        assert httpx.get(url + "/v1/models", headers=good).json()["data"][0]["id"] == "m"
        assert httpx.get(url + "/health").status_code == 200           # health and metrics need no key
        assert httpx.get(url + "/metrics").status_code == 200
        # A request the engine itself refuses at add_request (it could never fit the cache): 400, nothing runs.
        r = httpx.post(url + "/v1/completions", json={"prompt": [42] * 101, "max_tokens": 2}, headers=good)
        _check_error(r, 400, None, "invalid_value")
        assert "never fit" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json=body, headers=good).status_code == 200


def test_engine_failure_ends_requests_and_health_reports_it():
    engine = FakeEngine(step_s=0.02)
    with running_server(engine, served_model_name="m") as (url, _):
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "abc", "max_tokens": 50, "stream": True},
                          timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            engine.fail_next_step = True
            rest = [line for line in lines if line]
        assert '"error"' in rest[-2] and "device lost" in rest[-2] and rest[-1] == "data: [DONE]"
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_aborts_its_request(stream):
    engine = FakeEngine(step_s=0.02)
    with running_server(engine, served_model_name="m") as (url, _):
        body = {"prompt": "abc", "max_tokens": 200, "stream": stream}
        if stream:
            with httpx.stream("POST", url + "/v1/completions", json=body) as r:
                next(r.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json=body, timeout=0.3)
        _wait(lambda: engine.aborted)
        assert len(engine.aborted) == 1 and not engine.reqs
        assert httpx.get(url + "/health").status_code == 200
        ok = httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 3}).json()
        assert ok["usage"]["completion_tokens"] == 3


def _wait(cond, timeout: float = 5.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)

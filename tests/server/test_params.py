"""Request -> SamplingParams mapping without a server: fields pass through when the engine's SamplingParams has
them, are refused naming the field when it has not (unless neutral), and pydantic errors become 400 bodies."""
from dataclasses import dataclass, field

import pytest
from pydantic import ValidationError

from pagoda.engine.sampling_params import SamplingParams
from pagoda.server.errors import APIError, from_validation_error
from pagoda.server.params import ModelInfo, build_sampling_params, resolve_max_tokens
from pagoda.server.protocol import ChatCompletionRequest, CompletionRequest

INFO = ModelInfo("m", max_model_len=100, vocab_size=50, sampling_params_cls=SamplingParams)


@dataclass(kw_only=True)
class _RicherParams(SamplingParams):
    """An engine whose SamplingParams has penalties and logit bias (as a later engine will)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)


def _params(info=INFO, **body):
    return build_sampling_params(CompletionRequest(prompt="x", **body), 8, info)


def test_fields_map_to_sampling_params():
    p = _params(n=3, temperature=0.5, top_p=0.9, seed=7, stop="END", top_k=5, min_p=0.1, ignore_eos=True,
                min_tokens=2, stop_token_ids=[3], skip_special_tokens=False, include_stop_str_in_output=True,
                logprobs=4)
    assert (p.n, p.temperature, p.top_p, p.seed, p.stop, p.top_k, p.min_p) == (3, 0.5, 0.9, 7, ["END"], 5, 0.1)
    assert (p.ignore_eos, p.min_tokens, p.stop_token_ids, p.logprobs, p.max_tokens) == (True, 2, [3], 4, 8)
    assert (p.skip_special_tokens, p.include_stop_str_in_output) == (False, True)
    q = _params()                                  # OpenAI's defaults, not SamplingParams'
    assert (q.temperature, q.top_p, q.n, q.logprobs) == (1.0, 1.0, 1, None)
    chat = build_sampling_params(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True),
                                 8, INFO)
    assert chat.logprobs == 0                      # the sampled token's logprob only
    chat = build_sampling_params(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                                       top_logprobs=5), 8, INFO)
    assert chat.logprobs == 5


def test_unsupported_fields_refused_unless_neutral_or_supported(monkeypatch):
    import pagoda.server.params as server_params

    # An engine whose SamplingParams lacks penalties, bias and structured output: those fields are refused by name.
    lacking = {"presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "structured_outputs"}
    field_names = server_params._field_names
    monkeypatch.setattr(server_params, "_field_names", lambda cls: field_names(cls) - lacking)
    for body, name in (({"presence_penalty": 0.1}, "presence_penalty"), ({"logit_bias": {"3": 1}}, "logit_bias"),
                       ({"frequency_penalty": -1}, "frequency_penalty"),
                       ({"response_format": {"type": "json_object"}}, "response_format")):
        with pytest.raises(APIError) as e:
            _params(**body)
        assert e.value.param == name and e.value.status == 400 and e.value.code == "unsupported_parameter"
    _params(presence_penalty=0, frequency_penalty=0.0, logit_bias={}, repetition_penalty=1.0)
    monkeypatch.undo()
    richer = ModelInfo("m", 100, 50, _RicherParams)
    p = _params(richer, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"3": -100, "7": 2.5})
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias) == (0.5, 0.25, {3: -100.0, 7: 2.5})
    with pytest.raises(APIError, match="outside the vocabulary"):
        _params(richer, logit_bias={"50": 1})
    with pytest.raises(APIError, match=r"\[-100, 100\]"):
        _params(richer, logit_bias={"5": 101})


def test_engine_validation_names_the_field():
    for body, name in (({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2.0}, "min_p")):
        with pytest.raises(APIError) as e:
            _params(**body)
        assert e.value.param == name and name in e.value.message


def test_context_checks():
    assert resolve_max_tokens(None, 30, INFO, prompt_param="prompt", max_tokens_param="max_tokens") == 70
    assert resolve_max_tokens(70, 30, INFO, prompt_param="prompt", max_tokens_param="max_tokens") == 70
    for req, plen, param in ((71, 30, "max_tokens"), (1, 100, "prompt"), (0, 5, "max_tokens"), (5, 0, "prompt")):
        with pytest.raises(APIError) as e:
            resolve_max_tokens(req, plen, INFO, prompt_param="prompt", max_tokens_param="max_tokens")
        assert e.value.param == param


def test_validation_errors_name_the_field():
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": 5}]})
    err = from_validation_error(e.value)
    assert err.param == "messages.0.content" and err.status == 400
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"prompt": "x", "n": "two"})
    err = from_validation_error(e.value)
    assert (err.param, err.code) == ("n", "invalid_value")
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"


def test_engine_penalties_bias_and_response_format_pass_through():
    p = _params(presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.3, logit_bias={"3": -100})
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.3)
    assert p.logit_bias == {3: -100.0}
    p = _params(response_format={"type": "json_object"})
    assert p.structured_outputs is not None and p.structured_outputs.json_object

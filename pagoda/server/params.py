"""From a validated request body to the engine's inputs: prompt token ids and a ``SamplingParams``.

Every check a client can fail happens here, before the request reaches the engine, so that a bad
request is a 400 naming the field and never an error in the engine loop that other clients share:
prompt or ``max_tokens`` beyond the context, token ids outside the vocabulary, and fields the engine's
``SamplingParams`` does not have (accepted only at their neutral value, e.g. ``presence_penalty=0``).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

from pagoda.server.errors import APIError
from pagoda.server.protocol import ChatCompletionRequest, CompletionRequest

# Request fields handed to SamplingParams under the same name when the engine has them; otherwise
# accepted only at the neutral value shown (what "not given" means), else refused naming the field.
_PASSTHROUGH: dict[str, Any] = {
    "top_k": 0, "min_p": 0.0, "seed": None, "ignore_eos": False, "min_tokens": 0, "stop_token_ids": [],
    "skip_special_tokens": True, "include_stop_str_in_output": False, "spaces_between_special_tokens": True,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
}
MAX_LOGPROBS = 20          # OpenAI's limit on top_logprobs (vLLM's default max_logprobs)


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """What request checking needs to know about the served model."""
    name: str                      # the served model name (``--served-model-name`` or the folder)
    max_model_len: int             # context length: prompt + generated tokens
    vocab_size: int                # token ids must be in [0, vocab_size)
    sampling_params_cls: type      # the engine's SamplingParams


def _field_names(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    return {n for n in inspect.signature(cls).parameters if not n.startswith("_")}


def check_model(requested: str | None, info: ModelInfo) -> None:
    if requested is not None and requested != info.name:
        raise APIError(f"The model `{requested}` does not exist; this server serves `{info.name}`.",
                       param="model", code="model_not_found")


def check_token_ids(ids: list[int], info: ModelInfo, param: str) -> None:
    if not ids or (min(ids) >= 0 and max(ids) < info.vocab_size):
        return
    for t in ids:
        if not 0 <= t < info.vocab_size:
            raise APIError(f"Token id {t} in `{param}` is outside the vocabulary [0, {info.vocab_size}).",
                           param=param, code="invalid_value")


def resolve_max_tokens(requested: int | None, prompt_len: int, info: ModelInfo, *, prompt_param: str,
                       max_tokens_param: str) -> int:
    """``max_tokens`` checked against the context; ``None`` means up to the context, as in vLLM."""
    if prompt_len == 0:
        raise APIError(f"The prompt (`{prompt_param}`) is empty.", param=prompt_param, code="invalid_value")
    if prompt_len >= info.max_model_len:
        raise APIError(f"This model's maximum context length is {info.max_model_len} tokens, but the prompt "
                       f"has {prompt_len} tokens (at least one token must be generated). Please reduce the "
                       f"length of the prompt.", param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return info.max_model_len - prompt_len
    if requested < 1:
        raise APIError(f"`{max_tokens_param}` must be at least 1, got {requested}.", param=max_tokens_param,
                       code="invalid_value")
    if prompt_len + requested > info.max_model_len:
        raise APIError(f"This model's maximum context length is {info.max_model_len} tokens. However, you "
                       f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                       f"in the completion). Please reduce the length of the prompt or completion.",
                       param=max_tokens_param, code="context_length_exceeded")
    return requested


def _logprobs_count(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    if isinstance(req, CompletionRequest):
        k, param = req.logprobs, "logprobs"
    else:
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("`top_logprobs` needs `logprobs` set to true.", param="top_logprobs",
                           code="invalid_value")
        k, param = (req.top_logprobs or 0) if req.logprobs else None, "top_logprobs"
    if k is not None and k > MAX_LOGPROBS:
        raise APIError(f"`{param}` must be at most {MAX_LOGPROBS}, got {k}.", param=param, code="invalid_value")
    return k


def _unsupported(field: str, why: str = "") -> APIError:
    return APIError(f"`{field}` is not supported by this server's engine{why}.", param=field,
                    code="unsupported_parameter")


def build_sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, info: ModelInfo,
                          **engine_fields: Any):
    """The engine's SamplingParams for ``req``; ``engine_fields`` are set by the server (e.g. output_kind).

    Raises APIError (400) naming the field for anything the engine cannot honour or refuses.
    """
    cls = info.sampling_params_cls
    have = _field_names(cls)
    kwargs: dict[str, Any] = dict(n=req.n, max_tokens=max_tokens, logprobs=_logprobs_count(req))
    kwargs["temperature"] = 1.0 if req.temperature is None else req.temperature
    kwargs["top_p"] = 1.0 if req.top_p is None else req.top_p
    if req.stop is not None:
        kwargs["stop"] = req.stop
    for name, neutral in _PASSTHROUGH.items():
        value = getattr(req, name)
        if value is None:
            continue
        if name in have:
            kwargs[name] = value
        elif value != neutral:
            raise _unsupported(name)
    if req.stop_token_ids:
        check_token_ids(req.stop_token_ids, info, "stop_token_ids")
    if req.logit_bias:
        bias = _logit_bias(req.logit_bias, info)
        if "logit_bias" not in have:
            raise _unsupported("logit_bias")
        kwargs["logit_bias"] = bias
    _response_format(req, have, kwargs)
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of != req.n:
            raise _unsupported("best_of", " (only best_of == n)")
        if req.echo:
            raise _unsupported("echo")
        if req.suffix:
            raise _unsupported("suffix")
    elif req.tools:
        raise _unsupported("tools")
    for name, value in engine_fields.items():
        if name in have:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        # The engine names the field first ("top_p must be in (0, 1], got 2.0").
        text = str(exc)
        field = text.split(" ", 1)[0] if text.split(" ", 1)[0] in kwargs else None
        raise APIError(text, param=field, code="invalid_value") from None


def _logit_bias(bias: dict[str, float], info: ModelInfo) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(f"`logit_bias` keys must be token ids, got {key!r}.", param="logit_bias",
                           code="invalid_value") from None
        if not -100.0 <= value <= 100.0:
            raise APIError(f"`logit_bias` values must be in [-100, 100], got {value}.", param="logit_bias",
                           code="invalid_value")
        out[token] = float(value)
    check_token_ids(list(out), info, "logit_bias")
    return out


def _response_format(req, have: set[str], kwargs: dict) -> None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return
    if "structured_outputs" not in have:
        raise _unsupported("response_format", f" (type {fmt.type!r} needs structured output)")
    from pagoda.engine import StructuredOutputsParams  # only engines with structured output reach here
    if fmt.type == "json_object":
        kwargs["structured_outputs"] = StructuredOutputsParams(json_object=True)
    else:
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError("`response_format.json_schema.schema` is required for type json_schema.",
                           param="response_format.json_schema", code="missing_required_parameter")
        kwargs["structured_outputs"] = StructuredOutputsParams(json=fmt.json_schema.json_schema)

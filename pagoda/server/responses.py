"""Response bodies and stream chunks of the OpenAI routes, built as plain dicts (shapes as OpenAI's and vLLM's).

Completions (``object: "text_completion"``, streamed chunks too):
    {"id": "cmpl-…", "object", "created", "model",
     "choices": [{"index", "text", "logprobs": null | {"tokens", "token_logprobs", "top_logprobs", "text_offset"},
                  "finish_reason": null | "stop" | "length", "stop_reason": null | str | int}],
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
Chat (``chat.completion`` / ``chat.completion.chunk``): choices carry ``message`` (or ``delta`` when streamed)
``{"role": "assistant", "content"}`` and ``logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``.
Streams are server-sent events ``data: {json}\\n\\n`` ending with ``data: [DONE]\\n\\n``; with
``stream_options.include_usage`` a last chunk has ``choices: []`` and the usage.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

SSE_DONE = "data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse(obj: dict) -> str:
    return f"data: {_dumps(obj)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(x: float) -> float:
    # JSON has no -inf; vLLM reports an impossible token's logprob as -9999.0.
    return x if math.isfinite(x) else -9999.0


def _top(step: dict, k: int) -> list[tuple[int, Any]]:
    """The k most likely entries of one step's {token_id: Logprob} dict, by rank."""
    ranked = sorted(((tid, lp) for tid, lp in step.items() if lp.rank is not None and lp.rank <= k),
                    key=lambda e: e[1].rank)
    return ranked[:k]


class LogprobsFormatter:
    """Turns the engine's per-token ``{token_id: Logprob}`` dicts into OpenAI's two logprobs shapes."""

    def __init__(self, decode: Callable[[list[int]], str], k: int):
        self._decode = decode
        self.k = k
        self._cache: dict[int, str] = {}

    def text(self, token_id: int, lp: Any) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        s = self._cache.get(token_id)
        if s is None:
            s = self._cache[token_id] = self._decode([token_id])
        return s

    def completion(self, token_ids: list[int], steps: list[dict], offset: int) -> tuple[dict, int]:
        """Completions' logprobs for new tokens whose text starts at character ``offset``; returns the end offset."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, step in zip(token_ids, steps, strict=False):
            lp = step.get(tid)
            tok = self.text(tid, lp)
            out["tokens"].append(tok)
            out["token_logprobs"].append(_finite(lp.logprob) if lp is not None else None)
            top: dict[str, float] = {}
            for t, e in _top(step, self.k):      # tokens that decode alike keep the likeliest's value
                top.setdefault(self.text(t, e), _finite(e.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(tok)
        return out, offset

    def chat(self, token_ids: list[int], steps: list[dict]) -> dict:
        content = []
        for tid, step in zip(token_ids, steps, strict=False):
            lp = step.get(tid)
            tok = self.text(tid, lp)
            content.append({"token": tok, "logprob": _finite(lp.logprob) if lp is not None else -9999.0,
                            "bytes": list(tok.encode("utf-8")),
                            "top_logprobs": [{"token": (t := self.text(i, e)), "logprob": _finite(e.logprob),
                                              "bytes": list(t.encode("utf-8"))} for i, e in _top(step, self.k)]})
        return {"content": content}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
                      stop_reason: Any = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
                stop_reason: Any = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason, "stop_reason": stop_reason}


def chat_delta_choice(index: int, delta: dict, logprobs: dict | None, finish_reason: str | None,
                      stop_reason: Any = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def envelope(request_id: str, obj: str, created: int, model: str, choices: list, use: dict | None = None) -> dict:
    body = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body

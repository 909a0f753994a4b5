"""`SamplingParams`: how one request is decoded (vLLM's names, defaults and meanings).

Validated on construction: a wrong value is a ValueError (a wrong type a TypeError) naming the field.
What depends on the model (token ids inside the vocabulary, bad words tokenized, a grammar compiled) is
checked at ``LLMEngine.add_request``. Penalties, logit bias, allowed tokens, bad words, min_tokens and
structured output are applied to the logits on the device before sampling (`pagoda.engine.logits`).
"""
from __future__ import annotations

import copy
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

from pagoda.engine.structured_params import StructuredOutputsParams

# Below this temperature a request decodes greedily (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


class RequestOutputKind(enum.IntEnum):
    """What each `LLMEngine.step` output carries (vLLM's enum): the whole text so far, only what is new
    since the previous output, or nothing until the request finishes."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _check_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")


def _check_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


@dataclass(kw_only=True)
class SamplingParams:
    """Decoding parameters of one request.

    n: completions per prompt. temperature: 0 (or below 1e-5) decodes greedily. top_p in (0, 1];
    top_k: -1 or 0 keeps every token, else the k most likely; min_p in [0, 1]: tokens below
    ``min_p * max prob`` are dropped (filters apply in the order min-p, top-k, top-p, after temperature).
    seed: a request-private random stream (completion i of n uses ``seed + i``), so its tokens do not
    depend on what else is in the batch. stop: strings that end the text (matched on the detokenized
    text, left out of it unless include_stop_str_in_output); stop_token_ids: tokens that end it (kept in
    token_ids, left out of the text). ignore_eos: do not stop at the end-of-sequence token(s).
    max_tokens: new tokens at most (None: up to the model's context length); min_tokens: EOS and
    stop_token_ids cannot be sampled, and stop strings do not match, before this many tokens.
    logprobs: also return the log-probabilities (of the model's raw logits) of the k most likely tokens
    and of the sampled one at each step. skip_special_tokens: leave special tokens out of the text.
    output_kind: see `RequestOutputKind` (`LLM.generate` uses FINAL_ONLY).

    Logits processing (vLLM's semantics, applied in this order before temperature and the filters):
    allowed_token_ids: only these tokens can be sampled. bad_words: words that cannot be generated (each
    is tokenized with and without a leading space; the last token of a word is forbidden when the output
    so far ends with the word's other tokens). logit_bias: ``{token_id: bias}`` added to the logits.
    min_tokens (above). Then repetition_penalty (> 0; 1 disables): the logit of every token seen in the
    prompt or the output is divided by it when positive, multiplied when not; frequency_penalty and
    presence_penalty (in [-2, 2]): ``frequency * count + presence * (count > 0)`` is subtracted, count
    being the token's occurrences in the output (OpenAI's definition). structured_outputs: the output
    follows a JSON schema, regex, choice or grammar (`StructuredOutputsParams`). logits_processors:
    per-request callables ``fn(output_token_ids, logits_row) -> logits_row`` (vLLM's earlier interface;
    they run on the host side of the step, one call per row: see `pagoda.engine.logits_processors`).
    extra_args: free-form values for user logits processors (unused by pagoda itself).
    """
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logits_processors: list[Callable] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict | None = None
    bad_words: list[str] | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        self._check_penalties()
        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disable), or at least 1, got {self.top_k}")
        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_int("seed", self.seed, allow_none=True)
        self._check_stops()
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check_bool(name, getattr(self, name))
        _check_int("max_tokens", self.max_tokens, allow_none=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                             f"got {self.min_tokens}")
        _check_int("logprobs", self.logprobs, allow_none=True)
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError(f"output_kind must be a RequestOutputKind, got {type(self.output_kind).__name__}")
        self._check_logits_fields()

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}")

    def _check_logits_fields(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise TypeError(f"logit_bias must be a dict of token id to float, got {type(self.logit_bias).__name__}")
            bias = {}
            for token, value in self.logit_bias.items():
                if isinstance(token, str) and token.strip().lstrip("-").isdigit():
                    token = int(token)       # JSON object keys (OpenAI's logit_bias) are strings
                _check_int("logit_bias", token)
                bias[token] = _check_float("logit_bias", value)
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)):
                raise TypeError(f"allowed_token_ids must be a list of int or None, "
                                f"got {type(self.allowed_token_ids).__name__}")
            self.allowed_token_ids = list(self.allowed_token_ids)
            for t in self.allowed_token_ids:
                _check_int("allowed_token_ids", t)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids is not None and empty")
        if self.bad_words is None:
            self.bad_words = []
        elif isinstance(self.bad_words, (list, tuple)):
            self.bad_words = list(dict.fromkeys(self.bad_words))
        else:
            raise TypeError(f"bad_words must be a list of str or None, got {type(self.bad_words).__name__}")
        for w in self.bad_words:
            if not isinstance(w, str):
                raise TypeError(f"bad_words must contain only strings, got {type(w).__name__}")
            if not w:
                raise ValueError(f"bad_words cannot contain an empty string, got bad_words={self.bad_words}")
        if self.logits_processors is not None:
            if not isinstance(self.logits_processors, (list, tuple)):
                raise TypeError(f"logits_processors must be a list of callables or None, "
                                f"got {type(self.logits_processors).__name__}")
            self.logits_processors = list(self.logits_processors)
            for fn in self.logits_processors:
                if not callable(fn):
                    raise TypeError(f"logits_processors must contain callables, got {type(fn).__name__}")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise TypeError(f"extra_args must be a dict or None, got {type(self.extra_args).__name__}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise TypeError(f"structured_outputs must be a StructuredOutputsParams, "
                            f"got {type(self.structured_outputs).__name__}")

    def _check_stops(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise TypeError(f"stop must be a str, a list of str or None, got {type(self.stop).__name__}")
        for s in self.stop:
            if not isinstance(s, str):
                raise TypeError(f"stop must contain only strings, got {type(s).__name__}")
            if not s:
                raise ValueError("stop cannot contain an empty string")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise TypeError(f"stop_token_ids must be a list of int or None, got {type(self.stop_token_ids).__name__}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t)
            if t < 0:
                raise ValueError(f"stop_token_ids must be non-negative token ids, got {t}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def output_text_buffer_length(self) -> int:
        """Characters held back from streamed text so that a stop string is never shown before it is whole."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def clone(self) -> SamplingParams:
        """A copy (the engine may change output_kind; the caller's object is left alone). The logits
        processors are shared, not copied (they may hold state or resources that cannot be copied)."""
        memo = {id(fn): fn for fn in self.logits_processors or ()}
        return copy.deepcopy(self, memo)

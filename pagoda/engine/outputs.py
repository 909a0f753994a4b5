"""What the engine hands back: `RequestOutput` holding one `CompletionOutput` per sample (vLLM's classes,
same fields and order), and `Logprob`, one entry of a step's logprobs dict."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """The log-probability of one token at one step: ``rank`` is 1 for the most likely token;
    ``decoded_token`` its text."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the k most likely tokens and the sampled one).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One completion of a request.

    index: which of the request's n samples; text / token_ids: generated so far (the whole completion,
    or what is new since the last output for RequestOutputKind.DELTA); cumulative_logprob: sum of the
    sampled tokens' logprobs (None unless logprobs were asked for); finish_reason: None while running,
    then "stop" (EOS, a stop token or a stop string), "length" (max_tokens or the context length) or
    "abort"; stop_reason: the stop string or stop token id that ended it (None for EOS or length).
    """
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt (text when given as text), prompt_token_ids, one
    CompletionOutput per sample (sorted by index), and finished (every sample is done).
    prompt_logprobs is always None here (not supported yet); num_cached_tokens: prompt tokens whose KV
    came from the prefix cache."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: object | None = None
    num_cached_tokens: int | None = None

    def add(self, next_output: RequestOutput, aggregate: bool) -> None:
        """vLLM's: fold a later output of the same request into this one. ``aggregate=True`` (outputs of
        RequestOutputKind.DELTA): each sample's new text, token ids and logprobs are appended and its latest
        cumulative logprob, finish and stop reasons kept; ``aggregate=False`` (CUMULATIVE): the later sample
        replaces the earlier. A sample this output lacks is added (the outputs stay sorted by index)."""
        self.finished = self.finished or next_output.finished
        if next_output.num_cached_tokens is not None:
            self.num_cached_tokens = next_output.num_cached_tokens
        outs, new = self.outputs, next_output.outputs
        if aggregate and len(outs) == 1 and len(new) == 1 and outs[0].index == new[0].index:
            cur, c = outs[0], new[0]           # one sample (the common case): append in place
            cur.text += c.text
            cur.token_ids = cur.token_ids + c.token_ids
            if c.logprobs is not None:
                cur.logprobs = (cur.logprobs or []) + c.logprobs
            cur.cumulative_logprob = c.cumulative_logprob
            cur.finish_reason, cur.stop_reason = c.finish_reason, c.stop_reason
            return
        mine = {c.index: i for i, c in enumerate(self.outputs)}
        for c in next_output.outputs:
            i = mine.get(c.index)
            if i is None:
                self.outputs.append(c)
                mine[c.index] = len(self.outputs) - 1
                continue
            if not aggregate:
                self.outputs[i] = c
                continue
            cur = self.outputs[i]
            cur.text += c.text
            cur.token_ids = [*cur.token_ids, *c.token_ids]
            if c.logprobs is not None:
                cur.logprobs = [*(cur.logprobs or []), *c.logprobs]
            cur.cumulative_logprob = c.cumulative_logprob
            cur.finish_reason, cur.stop_reason = c.finish_reason, c.stop_reason
        self.outputs.sort(key=lambda c: c.index)

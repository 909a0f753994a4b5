"""A request's outputs as plain tuples, as they cross from the engine process to the server, and their folding.

The engine process sends each step's outputs packed (`pack_output`): tuples of plain values without the prompt
(the server has it and never reads it back), which pickle without a class reconstructed per object. The server
keeps them packed until a stream's reader takes them: `fold` turns everything a stream has waiting into one
``RequestOutput`` (vLLM's output merge, `RequestOutput.add`), so a step costs the event loop a list append per
request and a stream that fell behind builds one output for many steps.

Packed output: ``(request_id, finished, num_cached_tokens, metrics, samples)``, each sample ``(index, text,
token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason)``.
"""
from __future__ import annotations

from itertools import chain

from pagoda.engine.outputs import CompletionOutput, RequestOutput

Packed = tuple


def pack_output(out: RequestOutput) -> Packed:
    return (out.request_id, out.finished, out.num_cached_tokens, out.metrics,
            [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason)
             for c in out.outputs])


def unpack_output(p: Packed) -> RequestOutput:
    request_id, finished, cached, metrics, samples = p
    return RequestOutput(request_id, None, [], None, [CompletionOutput(*c) for c in samples], finished, metrics,
                         cached)


def is_finished(item: RequestOutput | Packed) -> bool:
    return item[1] if type(item) is tuple else item.finished


def num_new_tokens(item: RequestOutput | Packed) -> int:
    """Token ids the output carries (over its samples)."""
    if type(item) is tuple:
        samples = item[4]
        return len(samples[0][2]) if len(samples) == 1 else sum(len(c[2]) for c in samples)
    outs = item.outputs
    return len(outs[0].token_ids) if len(outs) == 1 else sum(len(c.token_ids) for c in outs)


def fold(items: list, aggregate: bool) -> RequestOutput:
    """Outputs of one request, oldest first (packed or not), as one ``RequestOutput``: ``aggregate`` (DELTA) appends
    each sample's text, token ids and logprobs and keeps the latest of the rest; otherwise (CUMULATIVE) the latest
    sample replaces the earlier. One-sample packed outputs (the common case) join in one pass."""
    if aggregate and len(items) > 1 and all(type(x) is tuple and len(x[4]) == 1 for x in items):
        index = items[0][4][0][0]
        if all(x[4][0][0] == index for x in items):
            samples = [x[4][0] for x in items]
            last = samples[-1]
            lps = [s[4] for s in samples]
            logprobs = None if all(lp is None for lp in lps) else list(chain.from_iterable(lp or () for lp in lps))
            cached = next((x[2] for x in reversed(items) if x[2] is not None), None)
            sample = CompletionOutput(index, "".join(s[1] for s in samples),
                                      list(chain.from_iterable(s[2] for s in samples)), last[3], logprobs, last[5],
                                      last[6])
            return RequestOutput(items[0][0], None, [], None, [sample], any(x[1] for x in items), items[0][3],
                                 cached)
    out = unpack_output(items[0]) if type(items[0]) is tuple else items[0]
    for x in items[1:]:
        out.add(unpack_output(x) if type(x) is tuple else x, aggregate)
    return out

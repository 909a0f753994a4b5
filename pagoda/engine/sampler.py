"""One step's sampling: every sequence's next token from its row of logits, in as few sampler calls as
the batch allows, and the logprobs asked for.

Rows that decode greedily take the argmax (the first maximum, as ``torch.argmax`` and HF do). The other
rows go through temperature (pagoda's softmax with per-row temperatures), min-p, then top-k and top-p
(``filter_apply_order="top_k_first"``, vLLM's order) in ONE pagoda sampler call with per-row
tensors. A request with a seed draws from its own generator, in a call of its own, so that its tokens do
not depend on which other requests share the batch.
"""
from __future__ import annotations

import torch

import pagoda.sampling as ps
from pagoda.engine.sequence import Sequence


def _host_to(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator) -> torch.Tensor:
    """logits float32 ``[S, vocab]`` (processed), ``seqs[i]`` the sequence of row i; ``generator`` draws for
    rows without a seed. Returns int64 ``[S]`` token ids on the device (no host sync)."""
    device = logits.device
    greedy = [s.params.is_greedy for s in seqs]
    if all(greedy):
        return logits.argmax(dim=-1)
    # Every non-greedy row is written below (shared or seeded draw): the argmax pass only when some row needs it.
    tokens = logits.argmax(dim=-1) if any(greedy) else torch.empty(len(seqs), dtype=torch.int64,
                                                                   device=device)
    temps = [0.0 if g else s.params.temperature for g, s in zip(greedy, seqs, strict=True)]
    temperature = _host_to(temps, torch.float32, device)
    probs = ps.softmax(logits, temperature=temperature)     # greedy rows: one-hot (they keep the argmax anyway)
    min_p = [0.0 if g else s.params.min_p for g, s in zip(greedy, seqs, strict=True)]
    if any(min_p):
        mp = _host_to(min_p, torch.float32, device)
        probs = probs.masked_fill(probs < mp[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    top_k = _host_to([max(s.params.top_k, 0) for s in seqs], torch.int32, device)   # <= 0 keeps every token
    top_p = _host_to([s.params.top_p for s in seqs], torch.float32, device)
    shared = [i for i, (g, s) in enumerate(zip(greedy, seqs, strict=True)) if not g and s.generator is None]
    if shared:
        idx = _host_to(shared, torch.int64, device)
        drawn = ps.top_k_top_p_sampling_from_probs(probs, top_k[idx], top_p[idx], indices=idx, generator=generator)
        tokens[idx] = drawn.to(torch.int64)
    for i, (g, s) in enumerate(zip(greedy, seqs, strict=True)):
        if not g and s.generator is not None:
            drawn = ps.top_k_top_p_sampling_from_probs(probs[i:i + 1], top_k[i:i + 1], top_p[i:i + 1],
                                                       generator=s.generator)
            tokens[i:i + 1] = drawn.to(torch.int64)
    return tokens


def compute_logprobs(raw_logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]):
    """Logprobs of the model's raw logits (before any processing or temperature, vLLM's default) for the
    rows whose request asked for them, computed on the device (read back with the sampled tokens).

    Returns None when no row asked, else ``(rows, top_ids, top_lp, token_lp, token_rank)``: ``rows`` the
    row indices (a host list), then device tensors: per such row the ``k_max`` most likely token ids
    ``[R, k_max]`` and their logprobs (the row's own k is a prefix), the sampled token's logprob ``[R]``
    and its 1-based rank ``[R]``.
    """
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return None
    idx = _host_to(rows, torch.int64, raw_logits.device)
    lp = torch.log_softmax(raw_logits.index_select(0, idx).float(), dim=-1)
    k = min(max(seqs[i].params.logprobs for i in rows), lp.shape[1])
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    token_lp = lp.gather(1, tokens.index_select(0, idx)[:, None]).squeeze(1)
    rank = (lp > token_lp[:, None]).sum(dim=-1) + 1
    return rows, top_ids, top_lp, token_lp, rank

"""One step's sampling: every sequence's next token from its row of logits, in as few sampler calls as
the batch allows, and the logprobs asked for.

Rows that decode greedily take the argmax (the first maximum, as ``torch.argmax`` and HF do). When no
other row filters (no top-k, top-p or min-p), they draw from ``softmax(logits / temperature)`` by Gumbel-max
in one pass over the logits (no probabilities written). Otherwise they go through temperature (pagoda's
softmax with per-row temperatures), min-p, then top-k and top-p (``filter_apply_order="top_k_first"``,
vLLM's order) in ONE pagoda sampler call. A parameter every row shares is passed as a number (no copy to
the device), else as a per-row tensor. A request with a seed draws from its own generator, in a call of its
own, so that its tokens do not depend on which other requests share the batch.
"""
from __future__ import annotations

import torch

import pagoda.ops.sampling as ps
from pagoda.engine.sequence import Sequence


def _host_to(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


def _row_param(values: list, dtype: torch.dtype, device: torch.device):
    """A sampler parameter: the common value as a Python number when every row has it (the samplers take it
    as a kernel argument: no copy to the device, and the filters a value leaves off are skipped), else a
    ``[rows]`` device tensor."""
    first = values[0]
    for v in values:
        if v != first:
            return _host_to(values, dtype, device)
    return first


def _draw(tokens: torch.Tensor | None, seqs: list[Sequence], greedy: list[bool], device: torch.device, draw,
          draw_one) -> torch.Tensor:
    """The step's tokens: ``tokens`` (the greedy rows' argmax, or None) with every non-greedy row drawn. Rows
    without a seed in one call, ``draw(rows, indices)`` (``rows`` their positions; ``indices`` None when they
    are every row, whose tokens are then the draw itself, else those rows, int64 on the device); each seeded
    row alone, ``draw_one(i)``, from its own generator."""
    shared = [i for i, (g, s) in enumerate(zip(greedy, seqs, strict=True)) if not g and s.generator is None]
    if len(shared) == len(seqs):
        return draw(shared, None).to(torch.int64)
    if tokens is None:
        tokens = torch.empty(len(seqs), dtype=torch.int64, device=device)
    if shared:
        idx = _host_to(shared, torch.int64, device)
        tokens[idx] = draw(shared, idx).to(torch.int64)
    for i, (g, s) in enumerate(zip(greedy, seqs, strict=True)):
        if not g and s.generator is not None:
            tokens[i:i + 1] = draw_one(i).to(torch.int64)
    return tokens


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator) -> torch.Tensor:
    """logits ``[S, vocab]`` (processed: float32; raw: the model's dtype), ``seqs[i]`` the sequence of row i;
    ``generator`` draws for rows without a seed. Returns int64 ``[S]`` token ids on the device (no host sync)."""
    device = logits.device
    params = [s.params for s in seqs]
    greedy = [p.is_greedy for p in params]
    if all(greedy):
        return logits.argmax(dim=-1)
    vocab = logits.shape[1]
    # Every non-greedy row is written below (shared or seeded draw): the argmax pass only when some row needs it.
    tokens = logits.argmax(dim=-1) if any(greedy) else None
    filtered = any(not g and (p.min_p or 0 < p.top_k < vocab or p.top_p < 1.0)
                   for g, p in zip(greedy, params, strict=True))
    if not filtered:
        return _sample_temperature(logits, seqs, params, greedy, tokens, generator)
    temperature = _row_param([0.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)],
                             torch.float32, device)
    probs = ps.softmax(logits, temperature=temperature)     # greedy rows: one-hot (they keep the argmax anyway)
    min_p = [0.0 if g else p.min_p for g, p in zip(greedy, params, strict=True)]
    if any(min_p):
        mp = _row_param(min_p, torch.float32, device)
        mp = mp[:, None] if isinstance(mp, torch.Tensor) else mp
        probs = probs.masked_fill(probs < mp * probs.amax(dim=-1, keepdim=True), 0.0)
    # top_k <= 0 keeps every token: k = vocab (a scalar k >= vocab leaves the filter off).
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]

    def draw(rows, idx):
        k = _row_param([top_k[i] for i in rows], torch.int32, device)
        p = _row_param([top_p[i] for i in rows], torch.float32, device)
        return ps.top_k_top_p_sampling_from_probs(probs, k, p, indices=idx, generator=generator)

    return _draw(tokens, seqs, greedy, device, draw, lambda i: ps.top_k_top_p_sampling_from_probs(
        probs[i:i + 1], top_k[i], top_p[i], generator=seqs[i].generator))


def _sample_temperature(logits, seqs, params, greedy, tokens, generator) -> torch.Tensor:
    """`sample` when no row filters: each non-greedy row draws from ``softmax(logits / temperature)`` by
    Gumbel-max in one pass over its logits (`pagoda.ops.sampling.temperature_sampling_from_logits`: no
    probabilities written)."""
    device = logits.device

    def draw(rows, idx):
        t = _row_param([params[i].temperature for i in rows], torch.float32, device)
        return ps.temperature_sampling_from_logits(logits, t, indices=idx, generator=generator)

    return _draw(tokens, seqs, greedy, device, draw, lambda i: ps.temperature_sampling_from_logits(
        logits[i:i + 1], params[i].temperature, generator=seqs[i].generator))


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


@torch.inference_mode()
def warm_up_sampler(device: torch.device, vocab_size: int, dtype: torch.dtype, max_num_seqs: int) -> None:
    """Build, at an engine's start-up, the sampler kernels' variants a serving step meets, so that no request
    pays a Triton build: a batch of every sampling form (temperature only, top-k/top-p/min-p, greedy rows beside
    drawn ones with per-row parameters) at one row, at a batch under the device's SM count and at
    ``max_num_seqs`` (the samplers pick their block size by the batch against the SM count). Draws from a
    generator of its own: the engine's stream of random numbers is untouched. CUDA only."""
    from pagoda.engine.sampling_params import SamplingParams
    gen = torch.Generator(device)
    gen.manual_seed(0)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    forms = [lambda i: SamplingParams(temperature=0.7),
             lambda i: SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.01),
             lambda i: SamplingParams(temperature=0.0 if i % 2 else 0.5 + i % 3 / 10, top_p=0.9)]
    for n in sorted({1, min(sms - 1, max_num_seqs), max_num_seqs}):
        logits = torch.randn(n, vocab_size, device=device, dtype=dtype, generator=gen)
        for form in forms:
            sample(logits, [Sequence("warm-up", 0, [0], form(i), 1, frozenset(), None, 0.0) for i in range(n)], gen)
    torch.cuda.synchronize(device)

"""Sort-based sampling references: the CPU path of `pagoda.ops.sampling` and the oracle of its tests.

Semantics (shared with the Triton kernels, which reach the same sets without sorting):

- Zero-probability tokens (and NaN entries) are never kept or drawn.
- top-k keeps every token whose probability is >= the k-th largest value, so ties at the boundary
  are all kept (a row may keep more than k tokens when the k-th value is tied). ``top_k <= 0`` or
  ``top_k >= vocab`` keeps everything.
- top-p keeps token i iff the mass of the tokens strictly more likely than i is < ``top_p * total``
  (``total`` = the row's sum, so rows need not be normalised). That is the smallest set of most
  likely tokens reaching ``top_p``, with ties at the threshold all kept. ``top_p >= 1`` keeps every
  token; the most likely token is always kept (so ``top_p <= 0`` is greedy).
- min-p keeps tokens with ``p >= min_p * max(p)``; the most likely token is always kept.
- "joint" filtering keeps the intersection; "top_k_first" renormalises after top-k, then applies top-p.

Random draws come from ``generator`` (a CPU ``torch.Generator``); the same generator state gives
the same tokens. They are not bit-identical to the GPU kernels' Philox streams, only equal in law.
"""
from __future__ import annotations

import torch


def _gen(generator, seed, offset):
    """The generator to draw from: explicit seed/offset make a fresh generator, else ``generator``."""
    if seed is None:
        return generator
    s = int(seed.flatten()[0]) if isinstance(seed, torch.Tensor) else int(seed)
    o = 0 if offset is None else (int(offset.flatten()[0]) if isinstance(offset, torch.Tensor) else int(offset))
    return torch.Generator().manual_seed((s * 0x9E3779B1 + o) % (2**63))


def _per_row(value, batch: int, dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to("cpu", dtype).reshape(-1).expand(batch) if value.numel() == 1 else value.to("cpu", dtype)
    return torch.full((batch,), value, dtype=dtype)


def _rows(x: torch.Tensor, indices) -> torch.Tensor:
    x = x.detach().to("cpu", torch.float64)
    return x if indices is None else x[indices.to("cpu", torch.long)]


def keep_top_k(p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, V]``: values >= the k-th largest of their row (all of the row when disabled)."""
    vocab = p.shape[-1]
    top_k = top_k.to(torch.long)
    disabled = (top_k <= 0) | (top_k >= vocab)
    kth = p.sort(dim=-1, descending=True).values.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])
    return (p >= kth) | disabled[:, None]


def keep_top_p(p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, V]``: the nucleus {p >= t*}, t* the first sorted value whose cumulative mass
    reaches ``top_p * total``. Always holds the row's maximum."""
    sorted_p = p.sort(dim=-1, descending=True).values
    csum = sorted_p.cumsum(-1)
    target = top_p.to(p.dtype)[:, None] * p.sum(-1, keepdim=True)
    first = (csum < target).sum(-1, keepdim=True).clamp(max=p.shape[-1] - 1)
    keep = p >= sorted_p.gather(1, first)
    return keep | (top_p >= 1)[:, None]


def keep_min_p(p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    pmax = p.amax(-1, keepdim=True)
    return (p >= min_p.to(p.dtype)[:, None] * pmax) | (p == pmax)


def _draw(p: torch.Tensor, keep: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from ``p`` restricted to ``keep`` (renormalised); (tokens, valid)."""
    w = torch.where(keep & (p > 0), p, torch.zeros_like(p)).nan_to_num(0.0, 0.0, 0.0)
    valid = w.sum(-1) > 0
    w = torch.where(valid[:, None], w, torch.ones_like(w))  # invalid rows draw anything, then become 0
    tokens = torch.multinomial(w, 1, generator=generator).squeeze(1)
    return torch.where(valid, tokens, torch.zeros_like(tokens)), valid


def _finish(tokens, valid, indices, return_valid: bool):
    out = tokens.to(indices.dtype if indices is not None else torch.int32)
    return (out, valid) if return_valid else out


def softmax(logits, temperature=None, enable_pdl=None):
    """``softmax(logits / temperature)`` per row, float32 ``[B, V]``; temperature <= 0 gives the
    one-hot of the row's first maximum (greedy)."""
    x = logits.detach().to("cpu", torch.float64)
    t = _per_row(1.0 if temperature is None else temperature, x.shape[0], torch.float64)
    greedy = t <= 0
    probs = torch.softmax(x / torch.where(greedy, torch.ones_like(t), t)[:, None], dim=-1)
    onehot = torch.zeros_like(x).scatter_(1, x.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], onehot, probs).to(torch.float32)


def _draw_shared(p: torch.Tensor, indices: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per output ``i`` from row ``indices[i]`` of ``p`` ``[rows, V]`` (unfiltered); (tokens, valid).
    The outputs of each row are drawn together, so memory is O(rows x V + outputs), not O(outputs x V):
    FlashInfer's ``indices`` lets millions of outputs share a few rows."""
    idx = indices.to("cpu", torch.long).reshape(-1)
    w = torch.where(p > 0, p, torch.zeros_like(p)).nan_to_num(0.0, 0.0, 0.0)
    valid_rows = w.sum(-1) > 0
    order = torch.argsort(idx, stable=True)
    rows, counts = torch.unique_consecutive(idx[order], return_counts=True)
    drawn = torch.zeros(idx.numel(), dtype=torch.long)
    start = 0
    for r, c in zip(rows.tolist(), counts.tolist(), strict=True):
        if valid_rows[r]:
            drawn[start:start + c] = torch.multinomial(w[r], c, replacement=True, generator=generator)
        start += c
    tokens = torch.empty_like(drawn)
    tokens[order] = drawn
    return tokens, valid_rows[idx]


def _shares_rows(x: torch.Tensor, indices) -> bool:
    return indices is not None and indices.numel() > x.shape[0]


def sampling_from_probs(probs, indices=None, deterministic=True, generator=None, check_nan=False,
                        seed=None, offset=None, return_valid=False):
    if _shares_rows(probs, indices):
        tokens, valid = _draw_shared(_rows(probs, None), indices, _gen(generator, seed, offset))
        return _finish(tokens, valid, indices, return_valid)
    p = _rows(probs, indices)
    tokens, valid = _draw(p, torch.ones_like(p, dtype=torch.bool), _gen(generator, seed, offset))
    return _finish(tokens, valid, indices, return_valid)


def sampling_from_logits(logits, indices=None, deterministic=True, generator=None, check_nan=False,
                         seed=None, offset=None):
    if _shares_rows(logits, indices):
        return sampling_from_probs(torch.softmax(_rows(logits, None), -1), indices, deterministic, generator,
                                   check_nan, seed, offset)
    return sampling_from_probs(torch.softmax(_rows(logits, indices), -1), None, deterministic, generator,
                               check_nan, seed, offset).to(indices.dtype if indices is not None else torch.int32)


def _filtered(probs, indices, params, keep_of, generator, return_valid):
    """Draw under the mask ``keep_of(rows)``. Outputs that share rows (``indices`` longer than the rows) and
    parameters shared by every output (numbers or one-element tensors) filter each source row once and draw its
    outputs together (`_draw_shared`); otherwise every output gets its row."""
    if _shares_rows(probs, indices) and all(not isinstance(v, torch.Tensor) or v.numel() == 1 for v in params):
        base = _rows(probs, None)
        keep = keep_of(base)
        tokens, valid = _draw_shared(torch.where(keep, base, torch.zeros_like(base)), indices, generator)
        return _finish(tokens, valid, indices, return_valid)
    p = _rows(probs, indices)
    return _finish(*_draw(p, keep_of(p), generator), indices, return_valid)


def top_p_sampling_from_probs(probs, top_p, indices=None, deterministic=True, generator=None, check_nan=False,
                              seed=None, offset=None, return_valid=False):
    return _filtered(probs, indices, (top_p,), lambda p: keep_top_p(p, _per_row(top_p, p.shape[0], torch.float64)),
                     _gen(generator, seed, offset), return_valid)


def top_k_sampling_from_probs(probs, top_k, indices=None, deterministic=True, generator=None, check_nan=False,
                              seed=None, offset=None, return_valid=False):
    return _filtered(probs, indices, (top_k,), lambda p: keep_top_k(p, _per_row(top_k, p.shape[0], torch.long)),
                     _gen(generator, seed, offset), return_valid)


def min_p_sampling_from_probs(probs, min_p, indices=None, deterministic=True, generator=None, check_nan=False,
                              seed=None, offset=None, return_valid=False):
    return _filtered(probs, indices, (min_p,), lambda p: keep_min_p(p, _per_row(min_p, p.shape[0], torch.float64)),
                     _gen(generator, seed, offset), return_valid)


def top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices=None, filter_apply_order="top_k_first",
                                    deterministic=True, generator=None, check_nan=False, seed=None, offset=None,
                                    return_valid=False):
    def keep_of(p):
        b = p.shape[0]
        keep_k = keep_top_k(p, _per_row(top_k, b, torch.long))
        if filter_apply_order == "top_k_first":
            # top-p over the top-k set renormalised: same order, target relative to the top-k mass.
            return keep_k & keep_top_p(torch.where(keep_k, p, torch.zeros_like(p)), _per_row(top_p, b, torch.float64))
        return keep_k & keep_top_p(p, _per_row(top_p, b, torch.float64))

    return _filtered(probs, indices, (top_k, top_p), keep_of, _gen(generator, seed, offset), return_valid)


def top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices=None, filter_apply_order="top_k_first",
                                     deterministic=True, generator=None, check_nan=False, seed=None, offset=None):
    if _shares_rows(logits, indices):
        return top_k_top_p_sampling_from_probs(torch.softmax(_rows(logits, None), -1), top_k, top_p, indices,
                                               filter_apply_order, deterministic, generator, check_nan, seed, offset)
    p = torch.softmax(_rows(logits, indices), -1)
    out = top_k_top_p_sampling_from_probs(p, top_k, top_p, None, filter_apply_order, deterministic, generator,
                                          check_nan, seed, offset)
    return out.to(indices.dtype if indices is not None else torch.int32)


def _normalise(w: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sum; a row with no mass stays all zeros (never 0/0 = NaN)."""
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))


def top_k_renorm_probs(probs, top_k, is_deterministic=False):
    """Zero every token outside top-k and renormalise; ``probs.dtype`` ``[B, V]``."""
    p = _rows(probs, None)
    keep = keep_top_k(p, _per_row(top_k, p.shape[0], torch.long)) & (p > 0)
    w = torch.where(keep, p, torch.zeros_like(p))
    return _normalise(w).to(probs.dtype)


def top_p_renorm_probs(probs, top_p, is_deterministic=False):
    """Zero every token outside the top-p nucleus and renormalise; ``probs.dtype`` ``[B, V]``."""
    p = _rows(probs, None)
    keep = keep_top_p(p, _per_row(top_p, p.shape[0], torch.float64)) & (p > 0)
    w = torch.where(keep, p, torch.zeros_like(p))
    return _normalise(w).to(probs.dtype)


def top_k_mask_logits(logits, top_k):
    """Logits outside top-k set to -inf (ties at the k-th value kept); ``logits.dtype`` ``[B, V]``."""
    x = _rows(logits, None)
    keep = keep_top_k(x.nan_to_num(float("-inf")), _per_row(top_k, x.shape[0], torch.long))
    return torch.where(keep, x, torch.full_like(x, float("-inf"))).to(logits.dtype)


def chain_speculative_sampling(draft_probs, draft_token_ids, target_probs, maybe_output_accepted_token_num=None,
                               maybe_output_emitted_draft_token_num=None, deterministic=True, generator=None,
                               seed=None, offset=None):
    """Speculative verification (Leviathan et al. / Chen et al.) of a chain of ``n`` draft tokens.

    Draft token i is accepted iff ``u_i * q_i(d_i) < p_i(d_i)`` (probability ``min(1, p/q)``). At the
    first rejection ``e`` a token is drawn from ``max(p_e - q_e, 0)`` renormalised (from ``p_e`` when
    that is all zero); if all ``n`` are accepted, a bonus token is drawn from ``p_n``. Positions after
    the emitted token hold -1. ``accepted`` counts every position whose test passes (independently
    of earlier rejections); ``emitted`` is ``e`` (draft tokens emitted, bonus excluded).
    Returns ``(output_token_ids [B, n+1] int32, accepted [B] int32, emitted [B] int32)``; the counts
    are added in place into the ``maybe_output_*`` tensors when given.
    """
    gen = _gen(generator, seed, offset)
    q = draft_probs.detach().to("cpu", torch.float64)
    p = target_probs.detach().to("cpu", torch.float64)
    d = draft_token_ids.detach().to("cpu", torch.long)
    b, n = d.shape
    out = torch.full((b, n + 1), -1, dtype=torch.int32)
    accepted = torch.zeros(b, dtype=torch.int32)
    emitted = torch.zeros(b, dtype=torch.int32)
    u = torch.rand(b, n, generator=gen, dtype=torch.float64)
    for r in range(b):
        passed = [bool(u[r, i] * q[r, i, d[r, i]] < p[r, i, d[r, i]]) for i in range(n)]
        accepted[r] = sum(passed)
        e = passed.index(False) if False in passed else n
        emitted[r] = e
        out[r, :e] = d[r, :e].to(torch.int32)
        if e < n:
            resid = (p[r, e] - q[r, e]).clamp_min(0)
            w = resid if resid.sum() > 0 else p[r, e]
        else:
            w = p[r, n]
        w = w.clamp_min(0).nan_to_num(0.0)
        out[r, e] = int(torch.multinomial(w, 1, generator=gen)) if w.sum() > 0 else 0
    dev = draft_probs.device
    if maybe_output_accepted_token_num is not None:
        maybe_output_accepted_token_num += accepted.to(maybe_output_accepted_token_num)
        accepted = maybe_output_accepted_token_num
    if maybe_output_emitted_draft_token_num is not None:
        maybe_output_emitted_draft_token_num += emitted.to(maybe_output_emitted_draft_token_num)
        emitted = maybe_output_emitted_draft_token_num
    return out.to(dev), accepted.to(dev), emitted.to(dev)

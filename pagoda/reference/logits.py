"""Per-request logits processing in plain PyTorch: the CPU path of `pagoda.ops.logits` and the test oracle.

`apply_logits_state` edits a batch of logits rows from per-slot state (one slot per running request; row
``r`` reads slot ``row_slots[r]``, rows with a negative slot are left alone), in vLLM's order:

1. ``logit_add[s]`` is added where ``use_add[s]``: the request's logit bias, with ``-inf`` outside its
   allowed tokens;
2. banned tokens become ``-inf``: ``stop_ids[s]`` while ``num_output[s] < min_tokens[s]`` (min_tokens), and
   the last token of each bad word in ``bad_words[s]`` whose other tokens end the output (``last_tokens[s]``);
3. penalties, with ``c = output_counts[s, v]`` and ``seen = c > 0 or prompt_mask[s, v]``: where seen, the logit
   is divided by ``repetition_penalty[s]`` when positive and multiplied by it otherwise; then
   ``frequency_penalty[s] * c + presence_penalty[s] * (c > 0)`` is subtracted.

Bans commute with the other steps (``-inf`` stays ``-inf``), so where they happen does not matter.

Layouts (S slots, V vocabulary): ``output_counts`` int32 ``[S, V]``, ``prompt_mask`` uint8 ``[S, V]``,
penalties float32 ``[S]`` each, ``logit_add`` float32 ``[S, V]`` with ``use_add`` int32 ``[S]``,
``num_output`` / ``min_tokens`` int32 ``[S]``, ``stop_ids`` int32 ``[S, M]`` (-1 pads), ``bad_words`` int32
``[S, W, L]`` right-aligned (the banned token in column L-1, the word's other tokens before it, -1 pads on the
left; an unused word is all -1), ``last_tokens`` int32 ``[S, L]``: the last L-1 output tokens in columns
0..L-2, most recent in L-2 (-1 where the output is shorter; column L-1 unused).
"""
from __future__ import annotations

import torch

__all__ = ["apply_logits_state", "banned_token_ids"]


def banned_token_ids(row_slots: torch.Tensor, num_output, min_tokens, stop_ids, bad_words, last_tokens) -> torch.Tensor:
    """int64 ``[B, M + W]``: the tokens banned in each row (-1 where nothing is banned)."""
    slots = row_slots.clamp(min=0).long()
    parts = []
    if stop_ids is not None and stop_ids.shape[1]:
        active = (num_output[slots] < min_tokens[slots])[:, None]
        parts.append(torch.where(active, stop_ids[slots].long(), -1))
    if bad_words is not None and bad_words.shape[1]:
        words = bad_words[slots].long()                                   # [B, W, L]
        hist = last_tokens[slots].long()[:, None, :]                      # [B, 1, L]
        col = torch.arange(words.shape[2], device=words.device)
        ok = (words == -1) | (words == hist) | (col == words.shape[2] - 1)
        last = words[:, :, -1]
        parts.append(torch.where(ok.all(dim=-1) & (last >= 0), last, -1))
    if not parts:
        return torch.full((row_slots.shape[0], 0), -1, dtype=torch.int64, device=row_slots.device)
    banned = torch.cat(parts, dim=1)
    return torch.where((row_slots >= 0)[:, None], banned, -1)


def apply_logits_state(logits: torch.Tensor, row_slots: torch.Tensor, output_counts: torch.Tensor | None,
                       prompt_mask: torch.Tensor | None, presence_penalty: torch.Tensor | None,
                       frequency_penalty: torch.Tensor | None, repetition_penalty: torch.Tensor | None,
                       logit_add: torch.Tensor | None = None, use_add: torch.Tensor | None = None,
                       num_output: torch.Tensor | None = None, min_tokens: torch.Tensor | None = None,
                       stop_ids: torch.Tensor | None = None, bad_words: torch.Tensor | None = None,
                       last_tokens: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The module's three steps on ``logits [B, V]``. float32: in place, returns ``logits``; float64 (the
    oracle): a new float64 tensor, the input untouched. Groups of state left None are skipped."""
    out = logits if compute_dtype == logits.dtype else logits.to(compute_dtype)
    live = (row_slots >= 0).nonzero().flatten()
    if live.numel() == 0:
        return out
    slots = row_slots[live].long()
    x = out[live]
    if logit_add is not None:
        use = (use_add[slots] != 0)[:, None]
        x = torch.where(use, x + logit_add[slots].to(compute_dtype), x)
    banned = banned_token_ids(row_slots[live], num_output, min_tokens, stop_ids, bad_words, last_tokens)
    if banned.shape[1]:
        # amax, not a plain scatter: a pad (-1, sent to column 0) must not undo a real ban of token 0.
        hit = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
        hit.scatter_reduce_(1, banned.clamp(min=0), (banned >= 0).to(torch.int32), reduce="amax")
        x = x.masked_fill(hit != 0, float("-inf"))
    if output_counts is not None:
        counts = output_counts[slots].to(compute_dtype)
        seen = (output_counts[slots] > 0) | (prompt_mask[slots] != 0)
        rep = repetition_penalty[slots].to(compute_dtype)[:, None]
        penalised = torch.where(x > 0, x / rep, x * rep)
        x = torch.where(seen, penalised, x)
        x = x - frequency_penalty[slots].to(compute_dtype)[:, None] * counts
        x = x - presence_penalty[slots].to(compute_dtype)[:, None] * (counts > 0).to(compute_dtype)
    out[live] = x
    return out

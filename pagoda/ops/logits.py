"""Per-request logits processing of a batch from per-slot device state: logit bias and allowed tokens,
min_tokens and bad-word bans, repetition / frequency / presence penalties, with vLLM's semantics.

`apply_logits_state` edits ``logits`` float32 ``[B, V]`` in place (rows contiguous) and returns it. Row ``r``
belongs to slot ``row_slots[r]`` (int32 ``[B]``; a negative slot leaves the row alone). The state groups,
each optional (None skips it), and their layouts are those of `pagoda.reference.logits`:

- penalties: ``output_counts`` int32 ``[S, V]``, ``prompt_mask`` uint8 ``[S, V]``, ``presence_penalty``,
  ``frequency_penalty``, ``repetition_penalty`` float32 ``[S]``;
- additive row: ``logit_add`` float32 ``[S, V]`` (bias, ``-inf`` outside the allowed tokens), ``use_add``
  int32 ``[S]``;
- bans: ``num_output``, ``min_tokens`` int32 ``[S]``, ``stop_ids`` int32 ``[S, M]``, ``bad_words`` int32
  ``[S, W, L]`` with ``last_tokens`` int32 ``[S, L]`` (M, W, L powers of two on the kernel path).

On CUDA (or CPU tensors under the Triton interpreter in tests) one Triton kernel does all of it
(`pagoda.kernels.sampling.penalties`); elsewhere the reference. No host synchronisation.
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks, _paged
from pagoda.reference import logits as _ref

__all__ = ["apply_logits_state"]


def _check_slot_tensor(name: str, t, dtype: torch.dtype, shape_tail: tuple, device) -> None:
    _checks.check_tensor(name, t, ndim=1 + len(shape_tail), dtypes=(dtype,))
    if tuple(t.shape[1:len(shape_tail) + 1]) != shape_tail and shape_tail:
        raise ValueError(f"{name} must have shape [S, {', '.join(map(str, shape_tail))}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the logits' device ({device}), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def apply_logits_state(logits: torch.Tensor, row_slots: torch.Tensor, *, output_counts: torch.Tensor | None = None,
                       prompt_mask: torch.Tensor | None = None, presence_penalty: torch.Tensor | None = None,
                       frequency_penalty: torch.Tensor | None = None, repetition_penalty: torch.Tensor | None = None,
                       logit_add: torch.Tensor | None = None, use_add: torch.Tensor | None = None,
                       num_output: torch.Tensor | None = None, min_tokens: torch.Tensor | None = None,
                       stop_ids: torch.Tensor | None = None, bad_words: torch.Tensor | None = None,
                       last_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring. Returns ``logits`` (edited in place)."""
    _checks.check_tensor("logits", logits, ndim=2, dtypes=(torch.float32,))
    if logits.shape[1] and logits.stride(1) != 1:
        raise ValueError("logits must be contiguous in its last dimension (it is written in place)")
    dev, vocab = logits.device, logits.shape[1]
    _check_slot_tensor("row_slots", row_slots, torch.int32, (), dev)
    if row_slots.shape[0] != logits.shape[0]:
        raise ValueError(f"row_slots must have one entry per logits row ({logits.shape[0]}), got {row_slots.shape[0]}")
    pen = (output_counts, prompt_mask, presence_penalty, frequency_penalty, repetition_penalty)
    if any(t is not None for t in pen):
        if any(t is None for t in pen):
            raise ValueError("the penalty state (output_counts, prompt_mask, presence_penalty, frequency_penalty, "
                             "repetition_penalty) is given whole or not at all")
        _check_slot_tensor("output_counts", output_counts, torch.int32, (vocab,), dev)
        _check_slot_tensor("prompt_mask", prompt_mask, torch.uint8, (vocab,), dev)
        for name, t in zip(("presence_penalty", "frequency_penalty", "repetition_penalty"), pen[2:], strict=True):
            _check_slot_tensor(name, t, torch.float32, (), dev)
    else:
        pen = None
    add = None
    if logit_add is not None or use_add is not None:
        if logit_add is None or use_add is None:
            raise ValueError("logit_add and use_add are given together")
        _check_slot_tensor("logit_add", logit_add, torch.float32, (vocab,), dev)
        _check_slot_tensor("use_add", use_add, torch.int32, (), dev)
        add = (logit_add, use_add)
    if stop_ids is not None and (num_output is None or min_tokens is None):
        raise ValueError("stop_ids needs num_output and min_tokens")
    for name, t in (("num_output", num_output), ("min_tokens", min_tokens)):
        if t is not None:
            _check_slot_tensor(name, t, torch.int32, (), dev)
    if stop_ids is not None:
        _check_slot_tensor("stop_ids", stop_ids, torch.int32, (stop_ids.shape[1] if stop_ids.dim() == 2 else -1,), dev)
    if bad_words is not None:
        _checks.check_tensor("bad_words", bad_words, ndim=3, dtypes=(torch.int32,))
        if last_tokens is None:
            raise ValueError("bad_words needs last_tokens")
        _check_slot_tensor("last_tokens", last_tokens, torch.int32, (bad_words.shape[2],), dev)
    if not _paged.use_triton(logits):
        return _ref.apply_logits_state(logits, row_slots, *(pen or (None,) * 5),
                                       logit_add=logit_add, use_add=use_add, num_output=num_output,
                                       min_tokens=min_tokens, stop_ids=stop_ids, bad_words=bad_words,
                                       last_tokens=last_tokens)
    from pagoda.kernels.sampling.penalties import logits_state_fwd

    for name, t in (("stop_ids", stop_ids), ("bad_words", bad_words)):
        width = t.shape[1] if t is not None else 0
        if width & (width - 1) or (name == "bad_words" and width and bad_words.shape[2] & (bad_words.shape[2] - 1)):
            raise ValueError(f"{name}'s padded dimensions must be powers of two on the kernel path, "
                             f"got {tuple(t.shape)}")
    logits_state_fwd(logits, row_slots, pen, add, (num_output, min_tokens, stop_ids, bad_words, last_tokens))
    return logits

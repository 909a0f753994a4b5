"""FlashInfer-compatible sampling filters (``flashinfer.sampling``): the operations that return a distribution
rather than a token: ``softmax`` with temperature, top-p / top-k renormalisation of probabilities, and the top-k
mask of logits. Importable from `pagoda.ops.sampling` and `pagoda.sampling` as well.

CUDA tensors run `pagoda.kernels.sampling.filters` (no sort, no host synchronisation); other devices run the
sort-based reference (`pagoda.reference.sampling`), which documents the exact semantics (ties kept at the
threshold, clamping of out-of-range per-row values). Input ``[batch, vocab]`` float32/float16/bfloat16; top_k /
top_p: a scalar or a ``[batch]`` tensor.
"""
from __future__ import annotations

import functools

import torch

from pagoda.ops import _sampling_args as _a
from pagoda.ops._sampling_args import PerRow, Tensor
from pagoda.reference import sampling as _ref

__all__ = ["softmax", "top_p_renorm_probs", "top_p_renorm_prob", "top_k_renorm_probs", "top_k_renorm_prob",
           "top_k_mask_logits"]


@functools.cache
def _filters():
    """`pagoda.kernels.sampling.filters`, imported at the first CUDA call (the CPU path needs no Triton)."""
    from pagoda.kernels.sampling import filters

    return filters


def softmax(logits: Tensor, temperature: PerRow | None = None, enable_pdl: bool | None = None) -> Tensor:
    """Row softmax of ``logits / temperature``: float32 ``[batch, vocab]``.

    temperature: None (1.0), a float >= 0 or a ``[batch]`` tensor; 0 gives the one-hot of the first
    maximum (greedy), exactly. enable_pdl: accepted for compatibility, ignored.
    """
    logits = _a.check_rows("logits", logits)
    temp = None if temperature is None else _a.per_row("temperature", temperature, logits.shape[0], logits.device,
                                                      "temperature")
    if not logits.is_cuda:
        return _ref.softmax(logits, temp).to(logits.device)
    _f = _filters()
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    _f.softmax(logits, out, temp)
    return out


def _renorm(name, x, value, kind, renorm):
    x = _a.check_rows(name, x)
    param = _a.per_row("top_k" if kind == "top_k" else "top_p", value, x.shape[0], x.device, kind)
    if not x.is_cuda:
        if not renorm:
            return _ref.top_k_mask_logits(x, param).to(x.device)
        fn = _ref.top_k_renorm_probs if kind == "top_k" else _ref.top_p_renorm_probs
        return fn(x, param).to(x.device)
    _f = _filters()
    out = torch.empty_like(x)
    _f.threshold_filter(x, out, param if kind == "top_k" else None, param if kind == "prob" else None, renorm)
    return out


def top_p_renorm_probs(probs: Tensor, top_p: PerRow, is_deterministic: bool = False) -> Tensor:
    """Zero the tokens outside the top-p nucleus and renormalise: ``[batch, vocab]``, probs' dtype.
    is_deterministic: accepted for compatibility (always deterministic)."""
    return _renorm("probs", probs, top_p, "prob", True)


def top_k_renorm_probs(probs: Tensor, top_k: int | Tensor, is_deterministic: bool = False) -> Tensor:
    """Zero the tokens below the k-th largest probability (ties kept) and renormalise:
    ``[batch, vocab]``, probs' dtype."""
    return _renorm("probs", probs, top_k, "top_k", True)


def top_k_mask_logits(logits: Tensor, top_k: int | Tensor) -> Tensor:
    """Set logits below the k-th largest to -inf (ties kept): ``[batch, vocab]``, logits' dtype."""
    return _renorm("logits", logits, top_k, "top_k", False)


top_p_renorm_prob = top_p_renorm_probs
top_k_renorm_prob = top_k_renorm_probs

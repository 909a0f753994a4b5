"""Sorting-free sampling warpers for Hugging Face ``generate``: HF's temperature / top-k / top-p / min-p chain on
pagoda's samplers.

    import pagoda.integrations.transformers as pt
    pt.register(sampling=True)          # or pt.register_sampling(): sampling only, attention untouched
    model.generate(ids, do_sample=True, top_k=50, top_p=0.9)

HF's `TopPLogitsWarper` sorts every row of the vocabulary at every step (and `TopKLogitsWarper` runs
``torch.topk``). `PagodaLogitsWarper` computes the same filtered logits without sorting, so HF's own softmax and
multinomial then draw from exactly the distribution HF's chain gives (the same token, seed for seed):

- with top-k (HF's default, top_k=50): one ``torch.topk`` and a few full-row passes decide the whole chain,
  ties included (`pagoda.integrations.hf_topk`; replayed from a CUDA graph at small batch);
- without it (top-p or min-p alone): pagoda's sorting-free ops (`top_k_mask_logits`, `softmax`,
  `top_p_renorm_probs`). The switch replaces, in the processor list ``generate`` builds, each
run of HF's ``Temperature -> TopK -> TopP -> MinP`` warpers (the order HF applies them in) by one
`PagodaLogitsWarper`; every other processor, greedy decoding and ``do_sample=False`` are untouched.

Semantics, HF's exactly (``filter_value`` -inf; the output is the scaled logits with the removed tokens at -inf):

- temperature: ``scores / temperature``.
- top-k: tokens below the k-th largest logit removed (ties with the k-th kept), k = min(top_k, vocab).
- top-p over the softmax of the top-k-masked logits: HF keeps token i iff the mass of the tokens after it in
  an ascending sort is < top_p. pagoda's nucleus keeps whole tie groups; where equal probabilities straddle the
  boundary (frequent with bf16 logits) HF keeps only some of them, as many as
  ``ceil((top_p - mass above) / p_tie)``, and that count is kept here too: the tied tokens of highest index, the
  ones a stable sort puts last (CUDA's sort of a long row is stable; on the CPU HF's unstable sort may keep
  others of the same group, of the same count and mass).
- min-p: tokens with ``p < min_p * max(p)`` removed (after top-p; the threshold only depends on the maximum).

Only ``min_tokens_to_keep == 1`` (every sampling mode but beam sampling) is taken over; other warpers stay HF's.
Where HF's float32 cumulative sum lands within rounding of the top-p boundary the two may differ by that one
boundary token (a rounding-size mass).

CUDA: torch.topk or pagoda's Triton kernels plus small torch ops; no sort, no host synchronisation, so the warper
can be captured in a CUDA graph. Under ``torch.compile`` it is one custom op (``pagoda::hf_warp_logits``): no
graph break. Elsewhere pagoda's reference path (sort-based, float64) runs.

No ``from __future__ import annotations`` here: torch.library reads the annotations as types.
"""
import contextlib
import functools

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pagoda.integrations import hf_topk as _topk
from pagoda.ops import sampling as _ops

__all__ = ["PagodaLogitsWarper", "warp_logits", "swap_warpers", "enable", "disable", "is_enabled", "sampling",
           "generate"]

# Off-values of the custom op's scalar arguments (a custom op takes no None scalars).
_NO_TEMPERATURE, _NO_TOP_K, _NO_TOP_P, _NO_MIN_P = 1.0, 0, 1.0, -1.0


def _check(temperature, top_k, top_p, min_p) -> None:
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not temperature > 0):
        raise ValueError(f"temperature must be a float > 0 or None, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off) or None, got {top_k}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a float in (0, 1] or None, got {top_p!r}")
    if min_p is not None and not (isinstance(min_p, (int, float)) and 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be a float in [0, 1] or None, got {min_p!r}")


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF's top-p kept set of ``probs`` (float32 ``[b, v]``, rows summing to 1) as bool ``[b, v]``, from pagoda's
    sorting-free nucleus: whole tie groups, then the tie group at the boundary cut to HF's count."""
    inside = _ops.top_p_renorm_probs(probs, top_p) > 0
    t = torch.where(inside, probs, float("inf")).amin(-1, keepdim=True)      # smallest kept probability
    above = probs > t
    tied = probs == t
    mass_above = torch.where(above, probs, 0.0).sum(-1, keepdim=True, dtype=torch.float64)
    n_tied = tied.sum(-1, keepdim=True)
    # HF removes an ascending position while the mass up to and including it is <= 1 - top_p: of the tied
    # group it keeps the last ceil((top_p - mass_above) / t) (at least one: the row's maximum when t is it).
    keep_tied = ((top_p - mass_above) / t.double()).ceil().clamp(min=1).minimum(n_tied)
    drop = n_tied - keep_tied.long()
    rank = tied.cumsum(-1, dtype=torch.int32)                                # 1-based rank within the group
    return above | (tied & (rank > drop))


def warp_logits(scores: torch.Tensor, temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """HF's ``Temperature -> TopK -> TopP -> MinP`` warper chain (``min_tokens_to_keep=1``, -inf filter) without
    sorting. scores: float ``[batch, vocab]`` (or ``[..., vocab]``). Returns a new tensor of scores' shape and
    dtype: ``scores / temperature`` with every removed token at -inf. None (top_k 0) turns a warper off."""
    _check(temperature, top_k, top_p, min_p)
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() < 1:
        raise TypeError("scores must be a floating-point tensor [..., vocab]")
    if top_p is not None and top_p >= 1.0:
        top_p = None                                     # keeps every token
    shape = scores.shape
    x = scores.reshape(-1, shape[-1])
    if top_k and x.numel():
        # One torch.topk, no sort: the common case (HF's GenerationConfig defaults to top_k=50).
        return _topk.topk_warp(x, None if temperature in (None, 1.0) else float(temperature), top_k,
                               None if top_p is None else float(top_p),
                               None if min_p is None else float(min_p)).reshape(shape)
    if temperature is not None and temperature != 1.0:
        x = x / temperature
    elif x.numel() == 0 or not (top_k or top_p is not None or min_p is not None):
        x = x.clone()                                    # never the input itself (a custom op must not alias)
    if x.numel() == 0:
        return x.reshape(shape)
    if top_k:
        x = _ops.top_k_mask_logits(x, top_k)
    if top_p is None and min_p is None:
        return x.reshape(shape)
    probs = _ops.softmax(x)                              # float32; zeros outside top-k
    keep = None if top_p is None else _nucleus(probs, float(top_p))
    if min_p is not None:
        # As HF: after top-p, relative to the maximum (which every filter keeps, so the order does not matter).
        kept_min = probs >= min_p * probs.amax(-1, keepdim=True)
        keep = kept_min if keep is None else keep & kept_min
    return torch.where(keep, x, float("-inf")).reshape(shape)


@torch.library.custom_op("pagoda::hf_warp_logits", mutates_args=())
def _warp_op(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """`warp_logits` as one opaque op for torch.compile (off-values: temperature 1, top_k 0, top_p 1, min_p -1)."""
    return warp_logits(scores, temperature, top_k or None, None if top_p >= 1.0 else top_p,
                       None if min_p < 0 else min_p)


@_warp_op.register_fake
def _warp_fake(scores, temperature, top_k, top_p, min_p):
    return torch.empty_like(scores)


class PagodaLogitsWarper(LogitsProcessor):
    """One HF logits processor doing what HF's ``Temperature -> TopK -> TopP -> MinP`` warpers do together
    (`warp_logits`), sorting-free. ``__call__(input_ids [b, s], scores [b, vocab]) -> scores [b, vocab]``."""

    def __init__(self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None):
        _check(temperature, top_k, top_p, min_p)
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k or None, top_p, min_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _warp_op(scores, _NO_TEMPERATURE if self.temperature is None else float(self.temperature),
                            self.top_k or _NO_TOP_K, _NO_TOP_P if self.top_p is None else float(self.top_p),
                            _NO_MIN_P if self.min_p is None else float(self.min_p))
        return warp_logits(scores, self.temperature, self.top_k, self.top_p, self.min_p)

    def __repr__(self) -> str:
        return (f"PagodaLogitsWarper(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
                f"min_p={self.min_p})")


# HF's warper classes in the order generate applies them, and the parameter each contributes.
_CHAIN = ((TemperatureLogitsWarper, "temperature"), (TopKLogitsWarper, "top_k"), (TopPLogitsWarper, "top_p"),
          (MinPLogitsWarper, "min_p"))


def _takes(proc) -> bool:
    """Whether pagoda reproduces this HF warper exactly (default -inf filter, one token kept at least)."""
    if type(proc) is TemperatureLogitsWarper:
        return proc.temperature > 0
    if getattr(proc, "min_tokens_to_keep", 1) != 1 or getattr(proc, "filter_value", None) != float("-inf"):
        return False
    if type(proc) is TopPLogitsWarper:
        return 0.0 < proc.top_p < 1.0      # HF's top_p=1 still removes zero-probability tokens; 0: greedy
    if type(proc) is MinPLogitsWarper:
        return 0.0 <= proc.min_p <= 1.0
    return proc.top_k >= 1


def swap_warpers(processors) -> LogitsProcessorList:
    """A copy of ``processors`` with each run of consecutive HF warpers in generate's order (temperature, top-k,
    top-p, min-p; each at most once; the ones `_takes`) replaced by one `PagodaLogitsWarper`."""
    out, run, stage = LogitsProcessorList(), {}, -1
    for proc in processors:
        pos = next((i for i, (cls, _) in enumerate(_CHAIN) if type(proc) is cls), None)
        if pos is not None and pos > stage and _takes(proc):
            run[_CHAIN[pos][1]], stage = proc, pos
            continue
        if run:
            out.append(_fused(run))
            run, stage = {}, -1
        if pos is not None and _takes(proc):     # starts a new run (same warper twice, or out of order)
            run[_CHAIN[pos][1]], stage = proc, pos
            continue
        out.append(proc)
    if run:
        out.append(_fused(run))
    return out


def _fused(run: dict) -> PagodaLogitsWarper:
    return PagodaLogitsWarper(
        temperature=float(run["temperature"].temperature) if "temperature" in run else None,
        top_k=run["top_k"].top_k if "top_k" in run else None,
        top_p=float(run["top_p"].top_p) if "top_p" in run else None,
        min_p=float(run["min_p"].min_p) if "min_p" in run else None)


def _mixin():
    from transformers.generation.utils import GenerationMixin
    return GenerationMixin


def enable() -> None:
    """Every ``generate`` of this process samples with pagoda's warpers: HF's ``_get_logits_processor`` (where
    generate builds its processor list) is wrapped to hand back `swap_warpers` of its list. Idempotent.
    Process-global on purpose: HF builds the list inside ``generate`` with no per-model hook."""
    mixin = _mixin()
    original = mixin._get_logits_processor
    if getattr(original, "_pagoda_original", None) is not None:
        return

    @functools.wraps(original)
    def _get_logits_processor(self, *args, **kwargs):
        return swap_warpers(original(self, *args, **kwargs))

    _get_logits_processor._pagoda_original = original
    mixin._get_logits_processor = _get_logits_processor


def disable() -> None:
    """Undo `enable` (HF's warpers again)."""
    mixin = _mixin()
    original = getattr(mixin._get_logits_processor, "_pagoda_original", None)
    if original is not None:
        mixin._get_logits_processor = original


def is_enabled() -> bool:
    return getattr(_mixin()._get_logits_processor, "_pagoda_original", None) is not None


@contextlib.contextmanager
def sampling(enabled: bool = True):
    """``with sampling(True):`` pagoda's warpers inside the block (``False``: HF's), the previous state after."""
    before = is_enabled()
    (enable if enabled else disable)()
    try:
        yield
    finally:
        (enable if before else disable)()


def generate(model, input_ids: torch.LongTensor, logits_processor: LogitsProcessorList, stopping_criteria,
             generation_config, **kwargs):
    """A ``custom_generate`` callable (HF's per-call hook, no global switch):
    ``model.generate(ids, do_sample=True, top_p=0.9, custom_generate=pagoda.integrations.hf_sampling.generate)``.
    Runs HF's own sampling / greedy loop with `swap_warpers` of the processor list generate prepared."""
    from transformers.generation.utils import GENERATION_MODES_MAPPING

    method = GENERATION_MODES_MAPPING[generation_config.get_generation_mode()]
    if method != "_sample":
        raise ValueError(f"custom_generate=pagoda sampling supports sampling and greedy decoding, not {method!r} "
                         f"(num_beams={generation_config.num_beams})")
    return type(model)._sample(model, input_ids, logits_processor=swap_warpers(logits_processor),
                               stopping_criteria=stopping_criteria, generation_config=generation_config, **kwargs)

"""FlashInfer-compatible sampling (``flashinfer.sampling``): same names, argument order, defaults, returns.

CUDA tensors run pagoda's sorting-free Triton kernels (`pagoda.kernels.sampling.row`,
`pagoda.kernels.sampling.filters`): no sort, no host synchronisation, so a sampler can sit inside a
captured CUDA graph when ``seed``/``offset`` are given as int64 device tensors. Other devices run
the sort-based reference (`pagoda.reference.sampling`), which also documents the exact semantics
(tie rules, clamping of out-of-range per-row tensor values, degenerate rows).

The samplers live here; the filters that return a distribution (``softmax``, ``top_*_renorm_probs``,
``top_k_mask_logits``) in `pagoda.ops.sampling_filters`, speculative verification in `pagoda.ops.speculative`;
all are importable from this module.

Shared arguments:
    probs / logits: ``[num_rows, vocab]`` float32/float16/bfloat16 (probabilities need not be
        normalised: filters are relative to each row's sum).
    indices: optional int32/int64 ``[batch]``: output i is drawn from row ``indices[i]``; the output
        then has indices' dtype, otherwise int32 ``[num_rows]``.
    top_k / top_p / min_p: a scalar or a 1-D tensor of length ``num_rows`` (with ``indices``: entry ``i`` for
        output ``i``, or one value per output), any real dtype (converted by value), checked as FlashInfer 0.6
        checks it (`pagoda.ops._sampling_args.filter_tensor`: ValueError for 0-D, 2-D or another length).
    deterministic: accepted for compatibility; pagoda's kernels are always deterministic.
    generator: a ``torch.Generator`` on the input's device (default generator when None); on CUDA the
        Philox (seed, offset) is read from it and its offset advanced, as FlashInfer does.
    check_nan: raise ValueError naming the bad rows when the input has NaN/inf (a host sync).
    seed, offset: explicit Philox state (ints, or int64 tensors of length 1 or batch), both or neither.
    return_valid: also return bool ``[batch]``: False for rows with no positive mass (token 0).
"""
from __future__ import annotations

import torch

from pagoda import _switches
from pagoda.ops import _sampling_args as _a
from pagoda.ops._sampling_args import PerRow, Philox, Tensor
from pagoda.ops.sampling_filters import (
    softmax,
    top_k_mask_logits,
    top_k_renorm_prob,
    top_k_renorm_probs,
    top_p_renorm_prob,
    top_p_renorm_probs,
)
from pagoda.ops.speculative import chain_speculative_sampling
from pagoda.reference import sampling as _ref

__all__ = [
    "softmax", "sampling_from_logits", "sampling_from_probs", "top_p_sampling_from_probs",
    "top_k_sampling_from_probs", "min_p_sampling_from_probs", "top_k_top_p_sampling_from_logits",
    "top_k_top_p_sampling_from_probs", "top_p_renorm_probs", "top_p_renorm_prob", "top_k_renorm_probs",
    "top_k_renorm_prob", "top_k_mask_logits", "chain_speculative_sampling",
]


_kernel_modules = None   # the kernel modules (`_kernels`), set at the first CUDA call and kept for the process


def _kernels():
    """(`pagoda.kernels.sampling.row`, `pagoda.kernels.sampling.filters`, `pagoda.kernels.sampling.split`): imported
    at the first CUDA call (the CPU path needs no Triton), then kept (an import statement per call costs ~1 µs)."""
    global _kernel_modules
    if _kernel_modules is None:
        from pagoda.kernels.sampling import filters as sampling_filters
        from pagoda.kernels.sampling import row as sampling
        from pagoda.kernels.sampling import split as sampling_split

        _kernel_modules = (sampling, sampling_filters, sampling_split)
    return _kernel_modules


# Plain and min-p sampling of small batches with each row split over several programs
# (`pagoda.kernels.sampling.split`): one program per row leaves a batch-1 row on one SM (~28 GB/s).
# PAGODA_SAMPLING_SPLIT=0 keeps the one-program kernel.
# min-p on the split path takes the race frontiers (`split._frontier_slice`: one exact pass instead of
# accept-or-redraw, whose redraw runs on one program for the draws outside N) where every slice is one step and
# the row has >= FRONTIER_MIN_SLICES slices. H200, mean of 8 seeds: b1 V=65536 13.5 vs 18.0 µs, V=128256 14.5 vs
# 19.7, V=151936 15.1 vs 17.2; b4 V=128256 15.3 vs 24.0; V=32000 (8 slices) 13.7 vs 12.8 (the redraw is cheap on a
# short row).
FRONTIER_MIN_SLICES = 16
MIN_SPLIT = 4          # fewer slices per row than this: the one-program kernel
MAX_SPLIT_BATCH = 8    # larger batches fill the SMs with one program per row (measured there: >= 1.1x FlashInfer)


def _split_slices(x, batch, top_k, top_p, min_p, from_logits, k_first) -> int:
    """Slices per row for the split-row sampler, 0 when the call keeps the one-program kernel."""
    if (batch > MAX_SPLIT_BATCH or from_logits or k_first or top_k is not None or top_p is not None
            or not _switches.sampling_split()):
        return 0
    sampling, _, sampling_split = _kernels()
    n = sampling_split.num_slices(x.shape[1], batch, sampling.sm_count(x.device))
    if n < MIN_SPLIT or (torch.cuda.is_current_stream_capturing() and not sampling_split.ready(x.device, batch)):
        return 0
    return n


def _launch(x, indices, batch, generator, seed, offset, return_valid, top_k=None, top_p=None, min_p=None,
            from_logits=False, out_dtype=None, k_first=False, temperature=None):
    _k = _kernels()[0]
    # Counters a call may use: per row ceil(vocab/4) (`_exp_at`) or whole 16+-token chunks of 4 counters each
    # (`_chunk_row_quads`: at most vocab for vocab >= 16, 4 below): max(vocab, 4) a row covers both.
    s, o = _a.philox_seed_offset(generator, x.device, batch, batch * max(x.shape[1], 4), seed, offset)
    dtype = out_dtype or (indices.dtype if indices is not None else torch.int32)
    out = torch.empty(batch, dtype=dtype, device=x.device)
    valid = torch.empty(batch, dtype=torch.bool, device=x.device)
    slices = _split_slices(x, batch, top_k, top_p, min_p, from_logits, k_first)
    if slices:
        _kernels()[2].split_sample(x, out, valid, indices, min_p, s, o, slices,
                                   frontier=slices >= FRONTIER_MIN_SLICES)
    else:
        _k.sample(x, out, valid, indices, top_k, top_p, min_p, s, o, from_logits, k_first=k_first,
                  temperature=temperature)
    return (out, valid) if return_valid else out


def _prepare(name, x, indices, check_nan, logits=False):
    x = _a.check_rows(name, x)
    batch = _a.check_indices(indices, x.shape[0], x.device)
    if check_nan:
        _a.check_nan_rows(name, x, logits)
    return x, batch


def _cpu(result, device):
    if isinstance(result, tuple):
        return tuple(r.to(device) for r in result)
    return result.to(device)


def sampling_from_logits(logits: Tensor, indices: Tensor | None = None, deterministic: bool = True,
                         generator: torch.Generator | None = None, check_nan: bool = False, seed: Philox = None,
                         offset: Philox = None) -> Tensor:
    """One token per row from ``softmax(logits)`` (Gumbel-max: one pass, no softmax materialised).
    Returns ``[batch]`` int32 (or indices' dtype)."""
    logits, batch = _prepare("logits", logits, indices, check_nan, logits=True)
    if not logits.is_cuda:
        _a.check_generator_cpu(generator, seed, offset)
        return _cpu(_ref.sampling_from_logits(logits, indices, deterministic, generator, False, seed, offset),
                    logits.device)
    return _launch(logits, indices, batch, generator, seed, offset, False, from_logits=True)


def temperature_sampling_from_logits(logits: Tensor, temperature: PerRow, indices: Tensor | None = None,
                                     generator: torch.Generator | None = None, seed: Philox = None,
                                     offset: Philox = None) -> Tensor:
    """One token per output from ``softmax(logits[row] / temperature)``: Gumbel-max in one pass over the
    logits (any float dtype), no scaled copy and no probabilities written. pagoda's (FlashInfer has no such
    call; it is what a serving engine's plain temperature sampling needs).

    temperature: a float > 0, or a float32 ``[batch]`` tensor (values > 0, not checked: that would read them
    back). indices: as in `sampling_from_logits`. Returns ``[batch]`` int32 (or indices' dtype)."""
    logits, batch = _prepare("logits", logits, indices, False, logits=True)
    if (not isinstance(temperature, torch.Tensor)
            and _a.row_param("temperature", temperature, batch, logits.device, "temperature") <= 0):
        raise ValueError(f"temperature must be > 0 (0 is greedy: take the argmax), got {temperature!r}")
    temp = _a.per_row("temperature", temperature, batch, logits.device, "temperature")
    if not logits.is_cuda:
        _a.check_generator_cpu(generator, seed, offset)
        rows = logits if indices is None else logits[indices.long()]
        scaled = rows.double() / temp.to(rows.device, torch.float64)[:, None]
        out = _ref.sampling_from_logits(scaled, None, True, generator, False, seed, offset)
        return _cpu(out.to(indices.dtype) if indices is not None else out, logits.device)
    return _launch(logits, indices, batch, generator, seed, offset, False, from_logits=True, temperature=temp)


def sampling_from_probs(probs: Tensor, indices: Tensor | None = None, deterministic: bool = True,
                        generator: torch.Generator | None = None, check_nan: bool = False, seed: Philox = None,
                        offset: Philox = None, return_valid: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """One token per row from ``probs`` (need not be normalised).

    Parameters
    ----------
    probs : torch.Tensor
        ``[num_rows, vocab]`` float32/float16/bfloat16 probabilities.
    indices : torch.Tensor, optional
        int32/int64 ``[batch]``: output i is drawn from row ``indices[i]`` (default: one output per row).
    deterministic : bool
        Accepted for compatibility; pagoda's kernels are always deterministic.
    generator : torch.Generator, optional
        Random state on the input's device (default generator when None); its offset is advanced.
    check_nan : bool
        Raise ValueError naming the rows that hold NaN/inf (a host sync).
    seed, offset : int or torch.Tensor, optional
        Explicit Philox state (ints, or int64 tensors of length 1 or batch; both or neither), instead of
        ``generator``: with device tensors the call can be captured in a CUDA graph.
    return_valid : bool
        Also return ``valid``.

    Returns
    -------
    samples : torch.Tensor
        ``[batch]`` token ids, int32 (indices' dtype when given).
    valid : torch.Tensor
        bool ``[batch]``, only with ``return_valid``: False for rows with no positive mass (token 0).

    Example
    -------
    >>> probs = torch.softmax(torch.randn(4, 32000, device="cuda"), -1)
    >>> pagoda.sampling.sampling_from_probs(probs, seed=0, offset=0).shape
    torch.Size([4])
    """
    probs, batch = _prepare("probs", probs, indices, check_nan)
    if not probs.is_cuda:
        _a.check_generator_cpu(generator, seed, offset)
        return _cpu(_ref.sampling_from_probs(probs, indices, deterministic, generator, False, seed, offset,
                                             return_valid), probs.device)
    return _launch(probs, indices, batch, generator, seed, offset, return_valid)


def top_p_sampling_from_probs(probs: Tensor, top_p: PerRow, indices: Tensor | None = None,
                              deterministic: bool = True, generator: torch.Generator | None = None,
                              check_nan: bool = False, seed: Philox = None, offset: Philox = None,
                              return_valid: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose mass reaches ``top_p`` of the
    row's total (ties at the threshold kept). No sort: a threshold search inside one kernel.

    Parameters
    ----------
    probs : torch.Tensor
        ``[num_rows, vocab]`` float32/float16/bfloat16 probabilities (need not be normalised).
    top_p : float or torch.Tensor
        In (0, 1], one for every row or float32 ``[batch]``.
    indices : torch.Tensor, optional
        int32/int64 ``[batch]``: output i is drawn from row ``indices[i]`` (default: one output per row).
    deterministic : bool
        Accepted for compatibility; pagoda's kernels are always deterministic.
    generator : torch.Generator, optional
        Random state on the input's device (default generator when None); its offset is advanced.
    check_nan : bool
        Raise ValueError naming the rows that hold NaN/inf (a host sync).
    seed, offset : int or torch.Tensor, optional
        Explicit Philox state (ints, or int64 tensors of length 1 or batch; both or neither), instead of
        ``generator``: with device tensors the call can be captured in a CUDA graph.
    return_valid : bool
        Also return ``valid``.

    Returns
    -------
    samples : torch.Tensor
        ``[batch]`` token ids, int32 (indices' dtype when given).
    valid : torch.Tensor
        bool ``[batch]``, only with ``return_valid``: False for rows with no positive mass (token 0).

    Example
    -------
    >>> probs = torch.softmax(torch.randn(4, 32000, device="cuda"), -1)
    >>> tokens = pagoda.sampling.top_p_sampling_from_probs(probs, 0.9)
    >>> tokens.dtype, tokens.shape
    (torch.int32, torch.Size([4]))
    """
    probs, batch = _prepare("probs", probs, indices, check_nan)
    tp = _a.row_param("top_p", top_p, batch, probs.device, "prob", probs.shape[0])
    if not probs.is_cuda:
        _a.check_generator_cpu(generator, seed, offset)
        return _cpu(_ref.top_p_sampling_from_probs(probs, tp, indices, deterministic, generator, False, seed,
                                                   offset, return_valid), probs.device)
    return _launch(probs, indices, batch, generator, seed, offset, return_valid, top_p=tp)


def top_k_sampling_from_probs(probs: Tensor, top_k: int | Tensor, indices: Tensor | None = None,
                              deterministic: bool = True, generator: torch.Generator | None = None,
                              check_nan: bool = False, seed: Philox = None, offset: Philox = None,
                              return_valid: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Top-k sampling: draw among the tokens at or above the k-th largest probability (ties kept).

    Parameters
    ----------
    probs : torch.Tensor
        ``[num_rows, vocab]`` float32/float16/bfloat16 probabilities (need not be normalised).
    top_k : int or torch.Tensor
        >= 1, one for every row or int32 ``[batch]``; values >= vocab (or <= 0 in a tensor) keep every token.
    indices : torch.Tensor, optional
        int32/int64 ``[batch]``: output i is drawn from row ``indices[i]`` (default: one output per row).
    deterministic : bool
        Accepted for compatibility; pagoda's kernels are always deterministic.
    generator : torch.Generator, optional
        Random state on the input's device (default generator when None); its offset is advanced.
    check_nan : bool
        Raise ValueError naming the rows that hold NaN/inf (a host sync).
    seed, offset : int or torch.Tensor, optional
        Explicit Philox state (ints, or int64 tensors of length 1 or batch; both or neither), instead of
        ``generator``: with device tensors the call can be captured in a CUDA graph.
    return_valid : bool
        Also return ``valid``.

    Returns
    -------
    samples : torch.Tensor
        ``[batch]`` token ids, int32 (indices' dtype when given).
    valid : torch.Tensor
        bool ``[batch]``, only with ``return_valid``: False for rows with no positive mass (token 0).

    Example
    -------
    >>> probs = torch.softmax(torch.randn(4, 32000, device="cuda"), -1)
    >>> pagoda.sampling.top_k_sampling_from_probs(probs, torch.tensor([1, 5, 50, 0], device="cuda")).shape
    torch.Size([4])
    """
    probs, batch = _prepare("probs", probs, indices, check_nan)
    tk = _a.row_param("top_k", top_k, batch, probs.device, "top_k", probs.shape[0])
    if not probs.is_cuda:
        _a.check_generator_cpu(generator, seed, offset)
        return _cpu(_ref.top_k_sampling_from_probs(probs, tk, indices, deterministic, generator, False, seed,
                                                   offset, return_valid), probs.device)
    return _launch(probs, indices, batch, generator, seed, offset, return_valid, top_k=tk)


def min_p_sampling_from_probs(probs: Tensor, min_p: PerRow, indices: Tensor | None = None,
                              deterministic: bool = True, generator: torch.Generator | None = None,
                              check_nan: bool = False, seed: Philox = None, offset: Philox = None,
                              return_valid: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Min-p sampling: draw among the tokens with ``p >= min_p * max(p)``.

    Parameters
    ----------
    probs : torch.Tensor
        ``[num_rows, vocab]`` float32/float16/bfloat16 probabilities (need not be normalised).
    min_p : float or torch.Tensor
        In [0, 1], one for every row or float32 ``[batch]``.
    indices : torch.Tensor, optional
        int32/int64 ``[batch]``: output i is drawn from row ``indices[i]`` (default: one output per row).
    deterministic : bool
        Accepted for compatibility; pagoda's kernels are always deterministic.
    generator : torch.Generator, optional
        Random state on the input's device (default generator when None); its offset is advanced.
    check_nan : bool
        Raise ValueError naming the rows that hold NaN/inf (a host sync).
    seed, offset : int or torch.Tensor, optional
        Explicit Philox state (ints, or int64 tensors of length 1 or batch; both or neither), instead of
        ``generator``: with device tensors the call can be captured in a CUDA graph.
    return_valid : bool
        Also return ``valid``.

    Returns
    -------
    samples : torch.Tensor
        ``[batch]`` token ids, int32 (indices' dtype when given).
    valid : torch.Tensor
        bool ``[batch]``, only with ``return_valid``: False for rows with no positive mass (token 0).

    Example
    -------
    >>> probs = torch.softmax(torch.randn(1, 151936, device="cuda"), -1)
    >>> pagoda.sampling.min_p_sampling_from_probs(probs, 0.05, return_valid=True)[1]
    tensor([True], device='cuda:0')
    """
    probs, batch = _prepare("probs", probs, indices, check_nan)
    mp = _a.row_param("min_p", min_p, batch, probs.device, "min_p", probs.shape[0])
    if not probs.is_cuda:
        _a.check_generator_cpu(generator, seed, offset)
        return _cpu(_ref.min_p_sampling_from_probs(probs, mp, indices, deterministic, generator, False, seed,
                                                   offset, return_valid), probs.device)
    return _launch(probs, indices, batch, generator, seed, offset, return_valid, min_p=mp)


def _top_k_top_p(name, x, top_k, top_p, indices, filter_apply_order, generator, check_nan, seed, offset,
                 return_valid, from_logits):
    _a.check_filter_order(filter_apply_order)
    x, batch = _prepare(name, x, indices, check_nan, logits=from_logits)
    tk = _a.row_param("top_k", top_k, batch, x.device, "top_k", x.shape[0])
    tp = _a.row_param("top_p", top_p, batch, x.device, "prob", x.shape[0])
    if not x.is_cuda:
        _a.check_generator_cpu(generator, seed, offset)
        fn = _ref.top_k_top_p_sampling_from_logits if from_logits else _ref.top_k_top_p_sampling_from_probs
        extra = {} if from_logits else {"return_valid": return_valid}
        return _cpu(fn(x, tk, tp, indices, filter_apply_order, True, generator, False, seed, offset, **extra),
                    x.device)
    _f = _kernels()[1]
    if from_logits:
        probs = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        _f.softmax(x, probs, None)
        x = probs
    k_off = isinstance(top_k, int) and top_k >= x.shape[1]  # scalar fast paths (no device read)
    p_off = isinstance(top_p, (int, float)) and top_p >= 1.0
    if filter_apply_order == "joint" or k_off or p_off:  # with one filter off the two orders agree
        return _launch(x, indices, batch, generator, seed, offset, return_valid, top_k=None if k_off else tk,
                       top_p=None if p_off else tp)
    # top_k_first: one sampler launch finds each row's k-th value itself (from the values it tracks
    # anyway, rarely one more pass) and runs top-p over the renormalised top-k set; nothing is written.
    return _launch(x, indices, batch, generator, seed, offset, return_valid, top_k=tk, top_p=tp, k_first=True)


def top_k_top_p_sampling_from_logits(logits: Tensor, top_k: int | Tensor, top_p: PerRow, indices: Tensor | None = None,
                                     filter_apply_order: str = "top_k_first", deterministic: bool = True,
                                     generator: torch.Generator | None = None, check_nan: bool = False,
                                     seed: Philox = None, offset: Philox = None) -> Tensor:
    """Top-k and top-p sampling from pre-softmax logits. ``"top_k_first"``: mask to the top-k logits,
    softmax, then top-p over the result; ``"joint"``: softmax, then keep tokens passing both filters
    (top-p relative to the full distribution). Returns ``[batch]`` int32 (or indices' dtype)."""
    return _top_k_top_p("logits", logits, top_k, top_p, indices, filter_apply_order, generator, check_nan, seed,
                        offset, False, True)


def top_k_top_p_sampling_from_probs(probs: Tensor, top_k: int | Tensor, top_p: PerRow, indices: Tensor | None = None,
                                    filter_apply_order: str = "top_k_first", deterministic: bool = True,
                                    generator: torch.Generator | None = None, check_nan: bool = False,
                                    seed: Philox = None, offset: Philox = None,
                                    return_valid: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Top-k and top-p sampling from probabilities.

    Parameters
    ----------
    probs : torch.Tensor
        ``[num_rows, vocab]`` float32/float16/bfloat16 probabilities (need not be normalised).
    top_k : int or torch.Tensor
        As in `top_k_sampling_from_probs`.
    top_p : float or torch.Tensor
        As in `top_p_sampling_from_probs`.
    filter_apply_order : str
        ``"top_k_first"``: top-p over the renormalised top-k set (one launch); ``"joint"``: tokens passing both
        filters, top-p relative to the full row.
    indices : torch.Tensor, optional
        int32/int64 ``[batch]``: output i is drawn from row ``indices[i]`` (default: one output per row).
    deterministic : bool
        Accepted for compatibility; pagoda's kernels are always deterministic.
    generator : torch.Generator, optional
        Random state on the input's device (default generator when None); its offset is advanced.
    check_nan : bool
        Raise ValueError naming the rows that hold NaN/inf (a host sync).
    seed, offset : int or torch.Tensor, optional
        Explicit Philox state (ints, or int64 tensors of length 1 or batch; both or neither), instead of
        ``generator``: with device tensors the call can be captured in a CUDA graph.
    return_valid : bool
        Also return ``valid``.

    Returns
    -------
    samples : torch.Tensor
        ``[batch]`` token ids, int32 (indices' dtype when given).
    valid : torch.Tensor
        bool ``[batch]``, only with ``return_valid``: False for rows with no positive mass (token 0).

    Example
    -------
    >>> probs = torch.softmax(torch.randn(4, 32000, device="cuda"), -1)
    >>> pagoda.sampling.top_k_top_p_sampling_from_probs(probs, 50, 0.9).shape
    torch.Size([4])
    """
    return _top_k_top_p("probs", probs, top_k, top_p, indices, filter_apply_order, generator, check_nan, seed,
                        offset, return_valid, False)

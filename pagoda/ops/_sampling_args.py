"""Validation and random-state helpers for `pagoda.ops.sampling` and its sibling modules (errors name the
argument), and the type aliases of their signatures."""
from __future__ import annotations

import functools
import numbers

import torch

from pagoda.ops import _checks

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
FILTER_ORDERS = ("top_k_first", "joint")

Tensor = torch.Tensor
# A per-request parameter: one value for every row, or a ``[batch]`` tensor.
PerRow = float | Tensor
# An explicit Philox seed or offset: an int, or an int64 tensor of length 1 or batch (graph-capturable).
Philox = int | Tensor | None


def check_rows(name: str, x) -> torch.Tensor:
    """``[batch, vocab]`` floating tensor with vocab >= 1; returned with a contiguous last dim."""
    _checks.check_tensor(name, x, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary (last dimension), got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def check_indices(indices, num_rows: int, device) -> int:
    """Optional int32/int64 ``[batch]`` map from outputs to rows; returns the output batch size.

    Values are range-checked for CPU tensors; on CUDA that would synchronise with the host, so the
    kernel clamps instead (an out-of-range index can never read outside the input).
    """
    if indices is None:
        return num_rows
    _checks.check_tensor("indices", indices, ndim=1, dtypes=INDEX_DTYPES)
    if indices.device != device:
        raise ValueError(f"indices must be on {device}, got {indices.device}")
    if num_rows == 0 and indices.numel():
        # The kernels clamp an index into [0, num_rows): with no row at all there is nothing to clamp to.
        raise ValueError(f"indices selects {indices.numel()} row(s) of an input with no rows")
    if not indices.is_cuda and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_rows):
        raise ValueError(f"indices must lie in [0, {num_rows}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    return indices.shape[0]


def per_row(name: str, value, batch: int, device, kind: str, rows: int | None = None) -> torch.Tensor:
    """A scalar or ``[batch]`` tensor parameter as a contiguous ``[batch]`` tensor on ``device``.

    kind: ``"top_k"`` (int, >= 1 as a scalar), ``"prob"`` (float in (0, 1]: top_p), ``"min_p"``
    (float in [0, 1]) or ``"temperature"`` (float >= 0). Tensor values are not range-checked (that
    would synchronise with the device); the kernels clamp them as documented in the reference.
    ``rows``: the input's row count (default ``batch``), which a top_k/top_p/min_p tensor's length must
    match as in FlashInfer (`filter_tensor`).
    """
    is_int = kind == "top_k"
    dtype = torch.int32 if is_int else torch.float32
    if isinstance(value, torch.Tensor):
        if kind != "temperature":
            return filter_tensor(name, value, batch, batch if rows is None else rows, device, dtype)
        _checks.check_tensor(name, value, dtypes=FLOAT_DTYPES + (torch.float64,))
        if value.dim() > 1 or value.numel() not in (1, batch):
            raise ValueError(f"{name} must be a scalar or a tensor of shape ({batch},), got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device}, got {value.device}")
        return value.reshape(-1).to(dtype).expand(batch).contiguous()
    fill = _check_scalar(name, value, batch, kind, is_int)
    if device.type == "cuda":
        stream = _uncaptured_stream(device)
        if stream is not None:
            # Keyed by stream too: a reader on the creating stream is ordered after the fill.
            return _constant_row(fill, dtype, batch, device, stream)
    return torch.full((batch,), fill, dtype=dtype, device=device)


def filter_tensor(name: str, value: torch.Tensor, batch: int, rows: int, device, dtype: torch.dtype) -> torch.Tensor:
    """A top_k / top_p / min_p tensor, accepted and rejected as FlashInfer 0.6 does: any real dtype (bool, int,
    float; converted by value as its ``.int()`` / ``.float()`` do), one dimension of length ``rows`` (the input's
    rows), with FlashInfer's ValueError wording for a 0-D tensor, a tensor of more dimensions, or another length.

    With ``indices`` (``batch`` outputs drawn from ``rows`` rows) FlashInfer's kernels read entry ``i`` for output
    ``i``; pagoda does the same, and also takes a tensor of length ``batch`` (one value per output). A length-``rows``
    tensor with more outputs than rows would be read past its end there: ValueError. Returns int32/float32 ``[batch]``.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if value.is_complex():
        raise TypeError(f"{name} must be a real (bool, integer or floating) tensor, got {value.dtype}")
    if value.dim() == 0:
        raise ValueError(f"{name}: Expected a 1D tensor of shape (batch_size,) or scalar for the sampling parameter, "
                         "but got a 0-dimensional tensor.")
    if value.dim() > 1:
        raise ValueError(f"{name}: Expected a 1D tensor or scalar for the sampling parameter, but got a "
                         f"{value.dim()}D tensor.")
    n = value.shape[0]
    if n != rows and n != batch:
        raise ValueError(f"{name}: Sampling parameter tensor batch size mismatch: expected length {rows} to match "
                         f"the reference tensor batch size, but got length {n}.")
    if n < batch:
        raise ValueError(f"{name} has {n} values for {batch} outputs (indices selects more outputs than the input "
                         "has rows): pass one value per output")
    if value.device != device:
        raise ValueError(f"{name} must be on {device}, got {value.device}")
    value = value[:batch] if n > batch else value
    return value.to(dtype).contiguous()


def row_param(name: str, value, batch: int, device, kind: str, rows: int | None = None):
    """`per_row` for the samplers: a tensor becomes the ``[batch]`` tensor, a scalar stays a checked Python
    number (``int`` for top_k, else ``float``), which the CUDA sampler takes as a kernel argument: no fill
    kernel, not even when the call is captured in a CUDA graph."""
    if isinstance(value, torch.Tensor):
        return per_row(name, value, batch, device, kind, rows)
    return _check_scalar(name, value, batch, kind, kind == "top_k")


# kind -> (test of a scalar value, the rule in an error message)
_SCALAR_RULES = {
    "top_k": (lambda v: v >= 1, ">= 1"),
    "prob": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "min_p": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "temperature": (lambda v: v >= 0.0, ">= 0"),
}


def _check_scalar(name: str, value, batch: int, kind: str, is_int: bool):
    """A scalar parameter checked against its kind's rule: ``int(value)`` for top_k, else ``float(value)``.
    Plain ints (and floats where a float is wanted) skip the ``numbers`` checks (ABC look-ups)."""
    exact = type(value) is int or (type(value) is float and not is_int)
    if not exact:
        wrong_kind = is_int and not isinstance(value, numbers.Integral)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or wrong_kind:
            want = "an int" if is_int else "a float"
            raise TypeError(f"{name} must be {want} or a tensor of shape ({batch},), got {type(value).__name__}")
    v = float(value)
    ok, rule = _SCALAR_RULES[kind]
    if not ok(v) or v != v:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return min(int(value), 2 ** 31 - 1) if is_int else v  # top_k >= vocab keeps every token anyway


# torch._C._cuda_getCurrentRawStream where this build has it (as Triton's driver uses): set at the first call.
_raw_stream = None


def _uncaptured_stream(device: torch.device) -> int | None:
    """The current CUDA stream of ``device`` as an int (``torch.cuda.current_stream(device).cuda_stream``),
    or None while a CUDA graph is being captured. Read through the raw getter, not a ``Stream`` object
    (the public call builds one: a few µs per call)."""
    global _raw_stream
    if torch.cuda.is_current_stream_capturing():
        return None
    if _raw_stream is None:
        _raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
            lambda index: torch.cuda.current_stream(index).cuda_stream)
    return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=256)
def _constant_row(value, dtype: torch.dtype, batch: int, device: torch.device, stream: int) -> torch.Tensor:
    """A cached ``[batch]`` tensor filled with ``value`` (global state: a bounded cache of read-only
    tensors). A scalar parameter then costs no fill kernel nor allocation per call; the kernels only
    read it. Not used under graph capture, where a fill is recorded into the graph instead."""
    return torch.full((batch,), value, dtype=dtype, device=device)


def check_nan_rows(name: str, x: torch.Tensor, logits: bool) -> None:
    """Raise ValueError listing rows with NaN or +inf (probabilities: also -inf/negatives; logits:
    rows that are entirely -inf). Synchronises with the device: only called when check_nan=True."""
    bad = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1)
    if logits:
        bad |= torch.isneginf(x).all(-1)
    else:
        bad |= (x < 0).any(-1) | ~(x.float().sum(-1) > 0)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        shown = rows[:8] + (["..."] if len(rows) > 8 else [])
        what = "NaN, +inf or all -inf" if logits else "NaN, inf, negative values or no positive mass"
        raise ValueError(f"{name} has rows with {what} (check_nan=True): rows {shown}")


def check_filter_order(filter_apply_order) -> None:
    if filter_apply_order not in FILTER_ORDERS:
        raise ValueError(f"filter_apply_order must be one of {FILTER_ORDERS}, got {filter_apply_order!r}")


def _check_seed_value(name: str, v, batch: int, device):
    if type(v) is int:  # the common host form: no tensor or ``numbers`` checks
        return v
    if isinstance(v, torch.Tensor):
        _checks.check_tensor(name, v, ndim=1, dtypes=(torch.int64,))
        if v.numel() not in (1, batch):
            raise ValueError(f"{name} tensor must have length 1 or {batch}, got {v.numel()}")
        if v.device != device:
            raise ValueError(f"{name} tensor must be on {device}, got {v.device}")
        return v.contiguous()
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int or an int64 tensor, got {type(v).__name__}")
    return int(v)


def philox_seed_offset(generator, device, batch: int, increment: int, seed=None, offset=None):
    """Philox (seed, offset) for a CUDA launch, as FlashInfer does.

    With explicit ``seed``/``offset`` (ints, or int64 device tensors of length 1 or batch: the form
    to use inside a captured CUDA graph) they are used as given and no generator is touched.
    Otherwise they are read from ``generator`` (default: the device's default CUDA generator),
    whose offset then advances by ``increment`` rounded up to 4, so consecutive calls draw fresh
    numbers and re-seeding the generator reproduces them.
    """
    if (seed is None) != (offset is None):
        raise ValueError("seed and offset must be given together (or neither)")
    if seed is not None:
        s, o = _check_seed_value("seed", seed, batch, device), _check_seed_value("offset", offset, batch, device)
        if isinstance(s, torch.Tensor) != isinstance(o, torch.Tensor):
            raise TypeError("seed and offset must both be ints or both be tensors")
        return s, o
    if torch.cuda.is_current_stream_capturing():
        # Reading the generator here would bake one (seed, offset) into the graph: every replay would
        # draw the same numbers. Device tensors are read by the kernel at replay time instead.
        raise ValueError("under CUDA graph capture pass seed= and offset= as int64 device tensors (update "
                         "offset between replays); a generator's state would be frozen into the graph")
    if generator is None:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[idx]
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    elif generator.device.type != "cuda":
        raise ValueError(f"generator must be a CUDA generator for CUDA inputs, got one on {generator.device}")
    return _advance(generator, increment)


def _advance(generator: torch.Generator, increment: int) -> tuple[int, int]:
    """(seed, offset) of a CUDA generator, whose offset then advances by ``increment`` rounded up to 4.

    Read and written through ``initial_seed``/``get_offset``/``set_offset`` (``get_state`` copies the
    state into a new CPU tensor, and editing it costs several tensor ops per call). The values are
    those of the state's int64 words: the seed, an unsigned 64-bit value, is returned as signed.
    """
    seed = generator.initial_seed()
    offset = generator.get_offset()
    generator.set_offset(offset + (increment + 3) // 4 * 4)
    return _as_int64(seed), _as_int64(offset)


def _as_int64(v: int) -> int:
    """An unsigned 64-bit value as the signed int64 with the same bits."""
    return v - (1 << 64) if v >= 1 << 63 else v


def check_generator_cpu(generator, seed=None, offset=None):
    """CPU path: a CPU ``torch.Generator`` or None; seed/offset must come together (ints or int64 tensors)."""
    if (seed is None) != (offset is None):
        raise ValueError("seed and offset must be given together (or neither)")
    for name, v in (("seed", seed), ("offset", offset)):
        if v is None or type(v) is int:
            continue
        if isinstance(v, torch.Tensor):
            _checks.check_tensor(name, v, ndim=1, dtypes=(torch.int64,))
            if v.numel() == 0:
                raise ValueError(f"{name} tensor must not be empty")
        elif isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int or an int64 tensor, got {type(v).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator for CPU inputs, got one on {generator.device}")

"""Host-side planning shared by the decode ops: option validation and the split-KV decision.

Flash-decoding splits a request's keys into chunks processed by separate programs when the batch alone
(``batch * num_kv_heads`` programs) cannot fill the GPU; the partial results are merged by LSE. The
chunk length is chosen on the host from the lengths (``plan`` may sync) and handed to the kernels
through a 1-element device tensor.
"""
from __future__ import annotations

import math

import torch

from pagoda.ops import _checks
from pagoda.reference.decode import POS_ENCODING_MODES

MAX_SPLITS = 64         # partial results per request the merge kernel reduces in registers
MIN_CHUNK = 256         # keys per split below which the merge costs more than the parallelism gains
WAVES = 2               # programs to aim for, per SM
FEW_WAVES = 4           # ... when a handful of (request, KV head) pairs must fill the GPU alone (b1 32k: 64
                        # splits of 512 keys, 2.53 TB/s, against 2.31 with 32 splits, on an H200)


def as_int(name: str, value, minimum: int) -> int:
    """An int (not a bool) >= ``minimum`` (`pagoda.ops._checks.check_int`)."""
    return _checks.check_int(name, value, minimum)


def optional_positive(name: str, value, default: float, allow_zero: bool = False) -> float:
    """None -> default; otherwise a finite float > 0 (>= 0 with allow_zero)."""
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite float {'>= 0' if allow_zero else '> 0'} or None, got {value!r}")
    return float(value)


def run_scales(q_scale, k_scale, v_scale) -> tuple[float, float | None]:
    """`run`'s optional q_scale/k_scale/v_scale (finite floats > 0), checked before anything is written:
    ``(factor on sm_scale, v_scale or None)``. Host floats only (no device read)."""
    factor = 1.0
    if q_scale is not None:
        factor *= optional_positive("q_scale", q_scale, 1.0)
    if k_scale is not None:
        factor *= optional_positive("k_scale", k_scale, 1.0)
    return factor, (None if v_scale is None else optional_positive("v_scale", v_scale, 1.0))


def check_heads(num_qo_heads, num_kv_heads, head_dim) -> tuple[int, int, int]:
    hq = as_int("num_qo_heads", num_qo_heads, 1)
    hk = as_int("num_kv_heads", num_kv_heads, 1)
    d = as_int("head_dim", head_dim, 1)
    if hq % hk:
        raise ValueError(f"num_qo_heads ({hq}) must be a multiple of num_kv_heads ({hk})")
    if d % 8 or d > _checks.MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be a multiple of 8 in 8..{_checks.MAX_HEAD_DIM}, got {d}")
    return hq, hk, d


def check_pos_encoding(pos_encoding_mode) -> str:
    if pos_encoding_mode not in POS_ENCODING_MODES:
        raise ValueError(f"pos_encoding_mode must be one of {POS_ENCODING_MODES}, got {pos_encoding_mode!r}")
    return pos_encoding_mode


def check_window_left(window_left) -> int:
    return as_int("window_left", window_left, -1)


_DTYPE_NAMES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float": torch.float32}


def canonical_dtype(name: str, value) -> torch.dtype:
    """A torch dtype or its name ('float16', 'bfloat16', 'float32') -> torch dtype among those three."""
    if isinstance(value, str):
        value = _DTYPE_NAMES.get(value.replace("torch.", ""), value)
    if value not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be float16, bfloat16 or float32 (dtype or name), got {value!r}")
    return value


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter's grids)."""
    if device.type != "cuda":
        return 1
    from pagoda.kernels._common import sm_count

    return sm_count(device)


def choose_chunk(longest: int, batch: int, num_kv_heads: int, sms: int, page_size: int,
                 fixed_split_size: int | None, disable_split_kv: bool, max_splits: int) -> tuple[int, int]:
    """``(chunk, splits)``: keys per split and the most splits any request needs; ``(0, 0)`` = no split."""
    if disable_split_kv or longest == 0 or max_splits < 2:
        return 0, 0
    if fixed_split_size is not None:
        chunk = fixed_split_size * page_size
    else:
        programs = batch * num_kv_heads
        if programs >= sms:
            return 0, 0
        waves = FEW_WAVES if programs * 8 < sms else WAVES
        want = -(-waves * sms // programs)
        chunk = max(-(-longest // want), MIN_CHUNK)
        chunk = -(-chunk // 64) * 64
    splits = -(-longest // chunk)
    if splits > max_splits:
        splits = max_splits
        chunk = -(-longest // splits)
        splits = -(-longest // chunk)
    if splits <= 1:
        return 0, 0
    return chunk, splits


def graph_splits(batch: int, num_kv_heads: int, sms: int, max_splits: int) -> int:
    """Fixed split count for a CUDA-graph wrapper (the grid is baked into the graph)."""
    return max(1, min(max_splits, -(-WAVES * sms // max(batch * num_kv_heads, 1))))


def workspace_views(buffer: torch.Tensor, batch: int, splits: int, num_qo_heads: int, head_dim: int):
    """float32 views ``o_part [batch, splits, Hq, D]`` and ``lse_part [batch, splits, Hq]`` over the bytes
    of ``buffer`` (None, None when ``splits == 0``)."""
    if splits == 0:
        return None, None
    n_o = batch * splits * num_qo_heads * head_dim
    n_l = batch * splits * num_qo_heads
    flat = buffer.view(torch.uint8).view(-1)
    usable = flat[: (flat.numel() // 4) * 4].view(torch.float32)
    o_part = usable[:n_o].view(batch, splits, num_qo_heads, head_dim)
    lse_part = usable[n_o:n_o + n_l].view(batch, splits, num_qo_heads)
    return o_part, lse_part


def max_splits_for(buffer: torch.Tensor, batch: int, num_qo_heads: int, head_dim: int) -> int:
    """The most splits whose partials fit in ``buffer`` (capped at MAX_SPLITS)."""
    per_split = max(batch, 1) * num_qo_heads * (head_dim + 1) * 4
    return min(MAX_SPLITS, buffer.numel() * buffer.element_size() // per_split)


def fast_tables(wrapper, indptr, indices, last_page_len, page_size: int, indptr_host, exact_lens: bool):
    """The page table as `pagoda.ops.decode_graph.fast_decode_plan` reads it: ``(batch, host indptr list, lengths)``.

    Shapes and dtypes are checked, values are not (FlashInfer's fast plan checks none). Only ``indptr`` is read on the
    host (``indptr_host`` when given, e.g. a CPU copy the caller keeps); the lengths are bounded by whole pages
    (``pages * page_size``: the split-KV chunking only needs an upper bound) unless ``exact_lens`` (multi-token rows,
    which FlashInfer also reads ``last_page_len`` for). A CUDA-graph wrapper needs exactly its fixed batch size."""
    for name, t in (("indptr", indptr), ("indices", indices), ("last_page_len", last_page_len)):
        _checks.check_tensor(name, t, ndim=1, dtypes=(torch.int32,))
    batch = last_page_len.shape[0]
    if indptr.shape[0] != batch + 1:
        raise ValueError(f"indptr must have length len(last_page_len) + 1 = {batch + 1}, got {indptr.shape[0]}")
    if wrapper.is_cuda_graph_enabled:
        if batch != wrapper._fixed_batch_size:
            raise ValueError(f"The batch size should be fixed in cudagraph mode, the runtime batch size {batch} "
                             f"mismatches the batch size set during initialization {wrapper._fixed_batch_size}")
        if indices.shape[0] > wrapper._indices_buf.shape[0]:
            raise ValueError("The size of indices should be less than or equal to the allocated buffer "
                             f"({indices.shape[0]} > {wrapper._indices_buf.shape[0]})")
    if indptr_host is not None:
        _checks.check_tensor("global_override_indptr_cpu", indptr_host, ndim=1)
        if indptr_host.shape[0] != batch + 1:
            raise ValueError(f"global_override_indptr_cpu must have length {batch + 1}, got {indptr_host.shape[0]}")
    ptr = (indptr_host if indptr_host is not None else indptr).tolist()
    if exact_lens:
        last = last_page_len.tolist()
        lens = [(ptr[i + 1] - ptr[i] - 1) * page_size + last[i] if ptr[i + 1] > ptr[i] else 0 for i in range(batch)]
    else:
        lens = [(ptr[i + 1] - ptr[i]) * page_size for i in range(batch)]
    return batch, ptr, lens

"""Host-side split-KV planning for the paged prefill (`pagoda.ops.prefill`).

A prefill program owns one KV head and a tile of ``BLOCK_M`` (query, head) rows of one request. When
the batch alone cannot fill the GPU (fewer than ``WAVES * SMs`` programs: a shared-prefix cascade level
with a few hundred queries against tens of thousands of keys, a decode-like batch of long requests),
each request's keys are cut into chunks of ``chunk`` keys (a multiple of the kernel's ``SPLIT_ALIGN``)
processed by separate programs, and the float32 partial states are merged by LSE. The split count
targets one wave of ``WAVES`` programs per SM (``FEW_WAVES`` for a handful of decode-like programs); chunks stay at
least ``MIN_CHUNK`` keys long so the
partial writes and the merge stay small next to the keys read.
"""
from __future__ import annotations

import torch

from pagoda.ops import _decode_plan as _plan

MIN_CHUNK = 512         # keys per split for tiles of 64/128 rows
MIN_CHUNK_SMALL = 256   # ... for 16-row (decode-like) tiles, whose programs are cheaper per key


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(n: int, align: int) -> int:
    return _cdiv(n, align) * align


def programs(qo_lens, group: int, num_kv_heads: int, block_m: int) -> int:
    """Programs that have rows to compute (tiles past a request's rows exit at once)."""
    return num_kv_heads * sum(_cdiv(n * group, block_m) for n in qo_lens)


def max_splits(buffer: torch.Tensor, rows: int, num_qo_heads: int, head_dim: int) -> int:
    """The most splits whose partial states for ``rows`` rows fit in ``buffer`` (0: not usable)."""
    if not buffer.is_contiguous():
        return 0
    return _plan.max_splits_for(buffer, rows, num_qo_heads, head_dim)


def min_chunk(block_m: int) -> int:
    return MIN_CHUNK_SMALL if block_m <= 16 else MIN_CHUNK


def _waves(n_programs: int, sms: int, block_m: int) -> int:
    """Programs per SM to aim for: more for a handful of decode-like (16-row, memory-bound) programs, as
    the decode plan does (`pagoda.ops._decode_plan.FEW_WAVES`)."""
    return _plan.FEW_WAVES if block_m <= 16 and n_programs * 8 < sms else _plan.WAVES


def choose(n_programs: int, longest: int, sms: int, cap: int, block_m: int, align: int,
           fixed_chunk: int | None = None) -> tuple[int, int]:
    """``(chunk, splits)`` for a plan with known lengths; ``(0, 0)`` = no split. ``cap``: the most splits
    the workspace (and the merge) allows; ``fixed_chunk`` (keys) overrides the heuristic."""
    if cap < 2 or longest == 0 or n_programs == 0:
        return 0, 0
    if fixed_chunk is not None:
        chunk = _round_up(fixed_chunk, align)
    else:
        splits = min(cap, _waves(n_programs, sms, block_m) * sms // n_programs, longest // min_chunk(block_m))
        if splits < 2:
            return 0, 0
        chunk = _round_up(_cdiv(longest, splits), align)
    if _cdiv(longest, chunk) > cap:
        chunk = _round_up(_cdiv(longest, cap), align)
    splits = _cdiv(longest, chunk)
    return (chunk, splits) if splits >= 2 else (0, 0)


def graph_splits(n_programs: int, sms: int, block_m: int, cap: int = _plan.MAX_SPLITS) -> int:
    """Fixed split count of a CUDA-graph wrapper (its grid is baked into the graph); 0 = no split."""
    n_programs = max(n_programs, 1)
    splits = min(cap, _waves(n_programs, sms, block_m) * sms // n_programs)
    return splits if splits >= 2 else 0


def graph_chunk(longest: int, splits: int, align: int, fixed_chunk: int | None = None) -> int:
    """Keys per split so that ``splits`` chunks cover ``longest`` keys (at least ``fixed_chunk``)."""
    chunk = max(align, _round_up(_cdiv(longest, splits), align))
    return max(chunk, _round_up(fixed_chunk, align)) if fixed_chunk is not None else chunk

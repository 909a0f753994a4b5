"""A step's host arrays, built from the scheduled batch: token ids, positions, the CSR page table (int32 page
ids cut from each sequence's `BlockTable`), the rows that sample and the inputs still on the device.

``step_inputs`` covers every step; ``decode_inputs`` is its loop for steps of one new token a sequence (the
engine's steady state, once per step over every running request). Both return the same keys: ``ids``,
``positions``, ``batch_indices``, ``qo_indptr``, ``kv_indptr``, ``last`` (lists of ints), ``kv_indices`` (an int32
array), ``sample_rows``, ``sampling`` (the sampling sequences), ``pend_rows``, ``pend_src``.
"""
from __future__ import annotations

import numpy as np

from pagoda.engine.block_table import page_ids
from pagoda.engine.scheduler import ScheduledBatch
from pagoda.engine.sequence import Sequence


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """The requests' page ids of a step in one int32 array."""
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def step_inputs(batch: ScheduledBatch, row_of: dict, block_size: int) -> dict:
    """Host arrays of a step. A token sampled by the previous step and not yet read back is taken from that
    step's tokens on the device (``row_of``: seq_id -> its row there; ``pend_rows`` / ``pend_src``: rows of this
    step, rows of the previous one)."""
    if batch.is_decode_only:
        return decode_inputs(batch, row_of, block_size)
    bs = block_size
    ids: list[int] = []
    positions: list[int] = []
    batch_indices: list[int] = []
    qo_indptr, kv_indptr, kv_indices, last = [0], [0], [], []
    sample_rows: list[int] = []
    sampling: list[Sequence] = []
    pend_rows: list[int] = []
    pend_src: list[int] = []
    t = 0
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        known = seq.num_tokens
        ids += seq.token_ids[start:min(end, known)]
        if end > known:
            # At most one token is pending (the previous step's), and it is this sequence's next input.
            src = row_of.get(seq.seq_id)
            if end - known != 1 or seq.num_pending_tokens < 1 or src is None:
                raise RuntimeError(f"{seq!r}: {end - known} inputs not yet read back, and not from the "
                                   "previous step")
            pend_rows.append(t + known - start)
            pend_src.append(src)
            ids.append(0)
        positions += range(start, end)
        batch_indices += [i] * n
        t += n
        qo_indptr.append(t)
        pages = -(-end // bs)
        kv_indices.append(page_ids(seq.block_table, pages))
        kv_indptr.append(kv_indptr[-1] + pages)
        last.append(end - (pages - 1) * bs)
        if end == known + seq.num_pending_tokens:
            sample_rows.append(t - 1)
            sampling.append(seq)
    return dict(ids=ids, positions=positions, batch_indices=batch_indices, qo_indptr=qo_indptr,
                kv_indptr=kv_indptr, kv_indices=_concat(kv_indices), last=last, sample_rows=sample_rows,
                sampling=sampling, pend_rows=pend_rows, pend_src=pend_src)


def decode_inputs(batch: ScheduledBatch, row_of: dict, block_size: int) -> dict:
    """`step_inputs` of a step of one new token a sequence (decodes, and one-token prefill chunks, which are not
    sampled unless they end their prompt): the same arrays, built without the multi-token cases (the
    engine's steady state, once per step over every running request)."""
    bs = block_size
    seqs = batch.seqs
    n = len(seqs)
    ids: list[int] = []
    positions: list[int] = []
    kv_indptr, kv_indices, last = [0], [], []
    pend_rows: list[int] = []
    pend_src: list[int] = []
    sample_rows: list[int] = []
    sampling: list[Sequence] = []
    pages_total = 0
    for i, seq in enumerate(seqs):
        pos = seq.num_computed_tokens
        known = seq.num_tokens      # (a tensor-parallel mirror holds only a window of token_ids: slices)
        if pos + 1 == known + seq.num_pending_tokens:
            sample_rows.append(i)
            sampling.append(seq)
        if pos < known:
            ids += seq.token_ids[pos:pos + 1]
        else:
            src = row_of.get(seq.seq_id)
            if pos != known or seq.num_pending_tokens < 1 or src is None:
                raise RuntimeError(f"{seq!r}: {pos + 1 - known} inputs not yet read back, and not from the "
                                   "previous step")
            pend_rows.append(i)
            pend_src.append(src)
            ids.append(0)
        positions.append(pos)
        pages = pos // bs + 1
        kv_indices.append(page_ids(seq.block_table, pages))
        pages_total += pages
        kv_indptr.append(pages_total)
        last.append(pos + 1 - (pages - 1) * bs)
    return dict(ids=ids, positions=positions, batch_indices=list(range(n)), qo_indptr=list(range(n + 1)),
                kv_indptr=kv_indptr, kv_indices=_concat(kv_indices), last=last, sample_rows=sample_rows,
                sampling=sampling, pend_rows=pend_rows, pend_src=pend_src)

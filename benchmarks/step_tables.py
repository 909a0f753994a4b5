"""Host time of a decode step's index tables: `step_inputs.decode_inputs` plus `host_tables.pack_int32`, with the
sequences' block tables as plain lists (page ids converted from Python ints every step) and as `BlockTable`
(cut from the int32 arrays they keep).

    python3 benchmarks/step_tables.py                 # 256 requests of ~1,100 tokens, page 16
    python3 benchmarks/step_tables.py --requests 64 --tokens 4096

CPU only: what a step costs the engine's host thread before anything reaches the device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagoda.engine.block_table import BlockTable  # noqa: E402
from pagoda.engine.host_tables import pack_int32  # noqa: E402
from pagoda.engine.scheduler import ScheduledBatch  # noqa: E402
from pagoda.engine.step_inputs import decode_inputs  # noqa: E402

NAMES = ("positions", "batch_indices", "qo_indptr", "kv_indptr", "last", "sample_rows", "kv_indices")


def _batch(requests: int, tokens: int, page_size: int, table) -> ScheduledBatch:
    """Decoding requests of ~``tokens`` tokens each (a spread of 7), every page id distinct."""
    batch = ScheduledBatch()
    stride = tokens // page_size + 8
    for i in range(requests):
        n = tokens + i % 7
        pages = -(-(n + 1) // page_size)
        seq = SimpleNamespace(seq_id=i, token_ids=[5] * n, num_tokens=n, num_computed_tokens=n - 1,
                              num_pending_tokens=0, block_table=table(range(i * stride, i * stride + pages)))
        batch.seqs.append(seq)
        batch.num_new_tokens.append(1)
    return batch


def step_ms(batch: ScheduledBatch, page_size: int, repeats: int) -> float:
    """Median over ``repeats`` of one step's tables, built and packed (ms)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        inp = decode_inputs(batch, {}, page_size)
        pack_int32([inp[k] for k in NAMES], False)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1100)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    rows = {}
    for name, table in (("list", list), ("BlockTable", BlockTable)):
        batch = _batch(args.requests, args.tokens, args.page_size, table)
        rows[name] = step_ms(batch, args.page_size, args.repeats)
    pages = sum(-(-(args.tokens + i % 7 + 1) // args.page_size) for i in range(args.requests))
    print(f"{args.requests} requests of ~{args.tokens} tokens, page {args.page_size}: {pages} page ids a step")
    for name, ms in rows.items():
        print(f"  block tables as {name:10s}: {ms:.3f} ms a step (tables built and packed, median of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

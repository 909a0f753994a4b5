"""Registry of `pagoda bench` studies: each maps the shared options onto one study module.

A study module provides a runner returning a report dict (``study``, ``meta``, ``backends``,
``results``) and ``tables(report, markdown=False)``; reports, plots and ``compare`` are shared.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(slots=True)
class BenchOptions:
    device: torch.device
    grid: str                                  # "small" (embedded CPU default) or "full"
    dtype: torch.dtype
    backends: list[str] | None = None          # subset of the study's backends / implementations
    head_dims: tuple = (64, 128)
    model: str | None = None                   # e2e: preset name or local folder
    batch_sizes: tuple | None = None           # e2e
    max_batch_search: bool | None = None       # e2e

    def __post_init__(self):
        if self.grid not in ("small", "full"):
            raise ValueError(f"grid must be 'small' or 'full', got {self.grid!r}")


@dataclass(slots=True, frozen=True)
class Study:
    name: str
    help: str
    run: Callable[[BenchOptions], dict] = field(repr=False)
    tables: Callable[..., str] = field(repr=False)


def _attention(o: BenchOptions) -> dict:
    from pagoda.bench import attention
    return attention.run_study(o.grid, o.backends, o.device, o.dtype, head_dims=o.head_dims)


def _attention_tables(report, markdown=False):
    from pagoda.bench import attention
    return attention.tables(report, markdown)


def _e2e(o: BenchOptions) -> dict:
    from pagoda.bench import e2e
    cfg = e2e.default_config(o.device, o.grid)
    if o.model:
        cfg.model = o.model
    if o.batch_sizes:
        cfg.batch_sizes = tuple(o.batch_sizes)
    if o.max_batch_search is not None:
        cfg.max_batch_search = o.max_batch_search
    cfg.__post_init__()
    return e2e.run_study(cfg, o.backends, o.device, o.dtype)


def _e2e_tables(report, markdown=False):
    from pagoda.bench import e2e
    return e2e.tables(report, markdown)


def _cascade(o: BenchOptions) -> dict:
    from pagoda.bench import cascade
    return cascade.run_study(o.grid, o.backends, o.device, o.dtype)


def _cascade_tables(report, markdown=False):
    from pagoda.bench import cascade
    return cascade.tables(report, markdown)


def _decode(o: BenchOptions) -> dict:
    from pagoda.bench import decode
    return decode.run_decode(o.grid, o.backends, o.device, o.dtype)


def _paged(o: BenchOptions) -> dict:
    from pagoda.bench import decode
    return decode.run_paged(o.grid, o.backends, o.device, o.dtype)


def _decode_tables(report, markdown=False):
    from pagoda.bench import decode
    return decode.tables(report, markdown)


def _sampling(o: BenchOptions) -> dict:
    from pagoda.bench import sampling
    # Samplers take float32 probabilities whatever the model dtype (as FlashInfer's do).
    return sampling.run_study(o.grid, o.backends, o.device, torch.float32)


def _sampling_tables(report, markdown=False):
    from pagoda.bench import sampling
    return sampling.tables(report, markdown)


STUDIES: dict[str, Study] = {s.name: s for s in [
    Study("attention", "prefill attention grid: TFLOP/s of every backend (flash-attention's grid on GPU)",
          _attention, _attention_tables),
    Study("decode", "paged decode TB/s (page 16 and 1) vs FlashInfer and SDPA on contiguous KV",
          _decode, _decode_tables),
    Study("paged", "paged prefill TFLOP/s vs pagoda's dense kernel and FlashInfer's paged prefill",
          _paged, _decode_tables),
    Study("cascade", "decode over a shared prefix: cascade vs plain paged decode, crossover grid",
          _cascade, _cascade_tables),
    Study("sampling", "samplers over (vocab, batch): pagoda vs torch sort-based vs FlashInfer vs read floor",
          _sampling, _sampling_tables),
    Study("e2e", "HF generate tokens/s per attn_implementation, batch size, cache, logits processor",
          _e2e, _e2e_tables),
]}

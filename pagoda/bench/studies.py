"""Registry of `pagoda bench` studies: each maps the shared options onto one study module.

A study module provides a runner returning a report dict (``study``, ``meta``, ``backends``,
``results``) and ``tables(report, markdown=False)``; reports, plots and ``compare`` are shared.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

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
    budget_s: float | None = None              # sampling, e2e: no case starts past this many seconds

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


def _e2e(o: BenchOptions) -> dict:
    from pagoda.bench import e2e
    cfg = e2e.default_config(o.device, o.grid)
    if o.model:
        cfg.model = o.model
    if o.batch_sizes:
        cfg.batch_sizes = tuple(o.batch_sizes)
    if o.max_batch_search is not None:
        cfg.max_batch_search = o.max_batch_search
    if o.budget_s is not None:
        cfg.budget_s = o.budget_s
    cfg.__post_init__()
    return e2e.run_study(cfg, o.backends, o.device, o.dtype)


def _sampling(o: BenchOptions) -> dict:
    from pagoda.bench import sampling
    return sampling.run_study(o.grid, o.backends, o.device, torch.float32, budget_s=o.budget_s)  # float32 probs


def _layers(o: BenchOptions) -> dict:
    from pagoda.bench import layers
    return layers.run_study(o.grid, o.backends, o.device, o.dtype, budget_s=o.budget_s)


def _grid_study(module: str, runner: str = "run_study"):
    """Runner for a study module whose entry is ``runner(grid, backends, device, dtype)``."""
    def run(o: BenchOptions) -> dict:
        fn = getattr(importlib.import_module(f"pagoda.bench.{module}"), runner)
        return fn(o.grid, o.backends, o.device, o.dtype)
    return run


def _tables_of(module: str):
    def tables(report, markdown=False):
        return importlib.import_module(f"pagoda.bench.{module}").tables(report, markdown)
    return tables


def _engine(o: BenchOptions) -> dict:
    from pagoda.bench import engine
    cfg = engine.EngineBenchConfig(model=o.model)
    if o.budget_s is not None:
        cfg.hf_budget_s = o.budget_s
    return engine.run_study(cfg, o.device)


STUDIES: dict[str, Study] = {s.name: s for s in [
    Study("attention", "prefill attention grid: TFLOP/s of every backend (flash-attention's grid on GPU)",
          _attention, _tables_of("attention")),
    Study("decode", "paged decode TB/s (page 16 and 1) vs FlashInfer and SDPA on contiguous KV",
          _grid_study("decode", "run_decode"), _tables_of("decode")),
    Study("paged", "paged prefill TFLOP/s vs pagoda's dense kernel and FlashInfer's paged prefill",
          _grid_study("decode", "run_paged"), _tables_of("decode")),
    Study("mask", "paged prefill with a custom mask (random, half-empty tiles) vs the unmasked kernel, same shape",
          _grid_study("masks"), _tables_of("masks")),
    Study("cascade", "decode over a shared prefix: cascade vs plain paged decode, crossover grid",
          _grid_study("cascade"), _tables_of("cascade")),
    Study("sampling", "samplers over (vocab, batch): pagoda vs torch sort-based vs FlashInfer vs read floor",
          _sampling, _tables_of("sampling")),
    Study("layers", "fused RMSNorm / gated activations vs PyTorch eager, torch.compile, FlashInfer, copy bandwidth",
          _layers, _tables_of("layers")),
    Study("e2e", "HF generate tokens/s per attn_implementation, batch size, cache, logits processor",
          _e2e, _tables_of("e2e")),
    Study("engine", "pagoda.LLM on nano-vLLM's benchmark vs its bandwidth ceiling and HF generate (own options: "
          "pagoda bench engine --help)", _engine, _tables_of("engine")),
]}

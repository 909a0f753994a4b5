"""torch.compile'd peers timed as their users run them: compiled for every shape, never silently eager.

FlexAttention is a compiled function: its users write ``torch.compile(flex_attention)`` once and call it
on every shape they meet. Dynamo compiles one graph per shape under ``dynamic=False``, all of them guards on
the same code object, and past ``recompile_limit`` (8 by default) it runs the function *uncompiled* with
only a log warning. A grid of 24 shapes would then time eager FlexAttention (a few TFLOP/s where the
compiled kernel does hundreds) from its ninth shape on. A study that times a compiled peer therefore:

- raises the recompile limits for its duration (`users_compile`), as a user compiling for many shapes
  does, and sets ``fail_on_recompile_limit_hit`` so that a limit still hit raises instead of falling back;
- compiles with ``fullgraph=True``, so that a graph break raises instead of running part of it eagerly;
- records per row what Dynamo did while the row was prepared and timed (`CompileWatch`): graphs
  compiled, graph breaks, eager fallbacks. A row with a break or a fallback is reported as an error.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

RECOMPILE_LIMIT = 256   # per code object: far above any study's number of shapes

_LIMITS = (("recompile_limit", "cache_size_limit"), ("accumulated_recompile_limit", "accumulated_cache_size_limit"))


def _limit_names(config) -> list[str]:
    """The names this torch gives the per-code-object and accumulated recompile limits (renamed in 2.6)."""
    return [new if hasattr(config, new) else old for new, old in _LIMITS
            if hasattr(config, new) or hasattr(config, old)]


@contextlib.contextmanager
def users_compile(limit: int = RECOMPILE_LIMIT) -> Iterator[dict]:
    """Within the block, Dynamo recompiles up to ``limit`` times per code object and fails (raises) rather
    than running uncompiled past it; the previous settings come back on exit. Yields the settings applied
    (for the report's meta)."""
    import torch._dynamo.config as config

    names = _limit_names(config)
    fail = "fail_on_recompile_limit_hit" if hasattr(config, "fail_on_recompile_limit_hit") else None
    saved = {n: getattr(config, n) for n in names + ([fail] if fail else [])}
    try:
        for n in names:
            setattr(config, n, max(saved[n], limit))
        if fail:
            setattr(config, fail, True)
        yield {n: getattr(config, n) for n in saved}
    finally:
        for n, v in saved.items():
            setattr(config, n, v)


def _snapshot() -> dict[str, int]:
    from torch._dynamo.utils import counters

    fallbacks = sum(v for k, v in counters["unimplemented"].items() if "recompile limit" in k.lower())
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "eager_fallbacks": fallbacks}


@dataclass(slots=True)
class CompileWatch:
    """What Dynamo did since construction: graphs compiled, graph breaks, recompile-limit fallbacks."""
    start: dict[str, int] = field(default_factory=_snapshot)

    def delta(self) -> dict[str, int]:
        now = _snapshot()
        return {k: now[k] - self.start[k] for k in now}


def silently_eager(delta: dict[str, int]) -> str | None:
    """Why a row watched by `CompileWatch` did not run fully compiled, or None when it did."""
    if delta.get("eager_fallbacks"):
        return f"ran uncompiled: Dynamo's recompile limit was hit {delta['eager_fallbacks']} time(s)"
    if delta.get("graph_breaks"):
        return f"ran partly uncompiled: {delta['graph_breaks']} graph break(s)"
    return None

"""Summary statistics the studies share (no torch: the serving load generator imports it too)."""
from __future__ import annotations


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` (linear between the two nearest ranks, as numpy's default and
    vLLM's benchmarks); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)

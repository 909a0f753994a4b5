"""Log-sum-exp conventions at the API boundary.

The kernels and the reference keep natural-log LSEs. FlashInfer's API speaks base 2 (its state is
``m * log2(e) + log2(d)``, merged with ``exp2``/``log2``), flash-attn's natural log: each entry point hands out the
LSE of the API it belongs to. The cascade merges (`pagoda.ops.cascade`) read and write base 2 directly.
"""
from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)   # natural-log LSE * LOG2E = base-2 LSE (-inf stays -inf)


def to_base2_(lse: torch.Tensor) -> torch.Tensor:
    """Natural-log ``lse`` to base 2, in place (one elementwise pass over a ``[rows, heads]`` float32 tensor)."""
    return lse.mul_(LOG2E)

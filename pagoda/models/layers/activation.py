"""Gated activation of the SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.ops import silu_and_mul

__all__ = ["SiluAndMul"]


class SiluAndMul(nn.Module):
    """``[..., 2 * d]`` (gate then up, as `MergedColumnParallelLinear` lays them out) -> ``silu(gate) * up``,
    ``[..., d]``. On a GPU pagoda's fused kernel (`pagoda.ops.silu_and_mul`: one read, one write, rounding
    as HF's ``act_fn(gate) * up``); elsewhere plain PyTorch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

"""Gated activation of the SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SiluAndMul"]


class SiluAndMul(nn.Module):
    """``[..., 2 * d]`` (gate then up, as `MergedColumnParallelLinear` lays them out) -> ``silu(gate) * up``,
    ``[..., d]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

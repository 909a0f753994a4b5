"""Tensor-parallel rank and size, read from `torch.distributed` when it is initialised.

Without an initialised process group every layer is a plain layer (rank 0 of 1), so a single process
needs no setup. Tensor parallelism is then a matter of how processes start (one per GPU, a process
group), not of the model code.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist


def tp_rank() -> int:
    """This process's rank in the tensor-parallel group (0 without `torch.distributed`)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def tp_size() -> int:
    """Number of tensor-parallel ranks (1 without `torch.distributed`)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``; a ValueError naming ``what`` when it does not divide evenly."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) must be divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


class LazyTensor(Protocol):
    """A checkpoint tensor not read yet (`pagoda.models.loader.CheckpointSlice`): its ``shape``, ``dim()``
    and ``narrow(dim, start, length)`` (another lazy tensor) as a tensor has them; ``materialize()`` reads
    only the selected part. Weight loaders narrow to their rank's part first, so a rank never reads
    what another rank holds."""

    shape: torch.Size

    def dim(self) -> int: ...

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor: ...

    def materialize(self) -> torch.Tensor: ...


def materialize(x: torch.Tensor | LazyTensor) -> torch.Tensor:
    """``x`` itself when it is a tensor, else the part of the checkpoint it selects, read now."""
    return x if isinstance(x, torch.Tensor) else x.materialize()

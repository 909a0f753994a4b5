"""Linear layers written for tensor parallelism (plain ``F.linear`` at one process).

Column-parallel layers split the output features across ranks (each rank computes its slice; no
communication); row-parallel layers split the input features (each rank computes a partial sum, then
an all-reduce). A Megatron MLP or attention block is column-parallel in, row-parallel out: one
all-reduce per block. Every parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``,
which copies this rank's slice of a full checkpoint tensor into it (``loaded_weight`` a tensor, or a lazy
checkpoint slice of which only this rank's part is read).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pagoda.models.layers.parallel import LazyTensor, divide, materialize, tp_rank, tp_size

__all__ = ["ReplicatedLinear", "ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
           "RowParallelLinear"]


def _load_shard(dst: torch.Tensor, loaded: torch.Tensor | LazyTensor, dim: int | None, rank: int, size: int,
                what: str) -> None:
    """``dst <- rank``'s slice of the full tensor ``loaded`` along ``dim`` (None: all of it), dtype converted
    on the way. The full shape is checked first, so a wrong checkpoint tensor is named, not mis-sliced."""
    full = list(dst.shape)
    if dim is not None:
        full[dim] *= size
    if list(loaded.shape) != full:
        raise ValueError(f"{what}: expected a tensor of shape {tuple(full)}, got {tuple(loaded.shape)}")
    dst.copy_(materialize(loaded if dim is None else loaded.narrow(dim, rank * dst.shape[dim], dst.shape[dim])))


class LinearBase(nn.Module):
    """``y = x @ weight.T + bias`` with ``weight [out_local, in_local]``; ``tp_dim`` is the dimension of
    ``weight`` that is split across ranks (0: output, 1: input, None: replicated)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_dim = tp_rank(), tp_size(), tp_dim
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in_local]`` -> ``[..., out_local]``."""
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, tp={self.tp_size}"


class ReplicatedLinear(LinearBase):
    """The whole layer on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, None)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        _load_shard(param, loaded_weight, None, 0, 1, type(self).__name__)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: ``weight [output_size / tp, input_size]``; no communication
    (the next layer, row-parallel, consumes the slice)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, tp_size(), "output_size"), bias, 0)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        _load_shard(param, loaded_weight, 0, self.tp_rank, self.tp_size, type(self).__name__)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers of the same input in one matmul (e.g. gate and up projections):
    rank r holds ``[slice r of output 0, slice r of output 1, ...]``; ``shard_id`` is the output's index."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(range(len(self.output_sizes)))  # what the loader must deliver
        for i, n in enumerate(self.output_sizes):
            divide(n, tp_size(), f"output_sizes[{i}]")
        super().__init__(input_size, sum(self.output_sizes), bias)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be an output index in 0..{len(self.output_sizes) - 1}, got {shard_id!r}")
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        _load_shard(param.narrow(0, offset, size), loaded_weight, 0, self.tp_rank, self.tp_size,
                    f"{type(self).__name__} shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """The q, k and v projections in one matmul, heads split across ranks: rank r holds its query heads,
    then its key heads, then its value heads (``shard_id`` "q", "k" or "v").

    With fewer KV heads than ranks (``tp_size % total_num_kv_heads == 0``) each rank holds one KV head,
    the one its query heads attend to: ``tp_size / total_num_kv_heads`` ranks replicate each KV head."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = False):
        total_num_kv_heads = total_num_heads if total_num_kv_heads is None else total_num_kv_heads
        tp = tp_size()
        self.head_size = head_size
        self.shard_ids = ("q", "k", "v")  # what the loader must deliver
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp, "num_attention_heads")
        if total_num_kv_heads >= tp:
            self.num_kv_heads = divide(total_num_kv_heads, tp, "num_key_value_heads")
            self.num_kv_head_replicas = 1
        else:
            if tp % total_num_kv_heads:
                raise ValueError(f"the tensor-parallel size ({tp}) must be a multiple of num_key_value_heads "
                                 f"({total_num_kv_heads}) when it is larger")
            self.num_kv_heads, self.num_kv_head_replicas = 1, tp // total_num_kv_heads
        super().__init__(hidden_size, (total_num_heads + 2 * self.num_kv_heads * tp) * head_size, bias)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor | LazyTensor, shard_id=None) -> None:
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        spans = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
        if shard_id not in spans:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        offset, size = spans[shard_id]
        what = f"{type(self).__name__} shard {shard_id}"
        if shard_id == "q":
            _load_shard(param.narrow(0, offset, size), loaded_weight, 0, self.tp_rank, self.tp_size, what)
            return
        # This rank's KV heads: block r of the KV heads, or the one head that ranks r.. share when replicated.
        dst = param.narrow(0, offset, size)
        full = [self.total_num_kv_heads * self.head_size, *dst.shape[1:]]
        if list(loaded_weight.shape) != full:
            raise ValueError(f"{what}: expected a tensor of shape {tuple(full)}, got {tuple(loaded_weight.shape)}")
        start = (self.tp_rank // self.num_kv_head_replicas) * kv
        dst.copy_(materialize(loaded_weight.narrow(0, start, kv)))


class RowParallelLinear(LinearBase):
    """Input features split across ranks: ``weight [output_size, input_size / tp]``; the partial outputs
    are summed with an all-reduce. The bias (not split) is added once, on rank 0."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(divide(input_size, tp_size(), "input_size"), output_size, bias, 1)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        dim = 1 if param.dim() == 2 else None  # the bias is whole on every rank
        _load_shard(param, loaded_weight, dim, self.tp_rank, self.tp_size, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., input_size / tp]`` -> ``[..., output_size]`` (summed over ranks)."""
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y

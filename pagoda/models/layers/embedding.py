"""Vocabulary-parallel embedding and LM head (plain layers at one process).

Rank r holds rows ``[r * V/tp, (r+1) * V/tp)`` of the ``[V, hidden]`` table. The embedding looks up the
ids it owns, zeroes the others and all-reduces; the LM head computes its slice of the logits and
gathers them on rank 0, the rank that samples. With tied embeddings the LM head shares the embedding's parameter.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pagoda.models.layers.parallel import LazyTensor, divide, materialize, tp_rank, tp_size

__all__ = ["VocabParallelEmbedding", "ParallelLMHead"]


class VocabParallelEmbedding(nn.Module):
    """``[T]`` token ids -> ``[T, embedding_dim]`` rows of the (vocabulary-split) table."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = divide(num_embeddings, self.tp_size, "vocab_size")
        self.vocab_start_idx = self.num_embeddings_per_partition * self.tp_rank
        self.vocab_end_idx = self.vocab_start_idx + self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor | LazyTensor, shard_id=None) -> None:
        n = param.shape[0]
        if loaded_weight.dim() != 2 or loaded_weight.shape[0] != self.num_embeddings or \
                loaded_weight.shape[1] != param.shape[1]:
            raise ValueError(f"{type(self).__name__}: expected a [{self.num_embeddings}, {param.shape[1]}] table, "
                             f"got {tuple(loaded_weight.shape)}")
        param.copy_(materialize(loaded_weight.narrow(0, self.tp_rank * n, n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        mine = (x >= self.vocab_start_idx) & (x < self.vocab_end_idx)
        y = F.embedding(torch.where(mine, x - self.vocab_start_idx, 0), self.weight)
        y = y * mine.unsqueeze(-1).to(y.dtype)
        dist.all_reduce(y)
        return y

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, dim={self.weight.shape[1]}, tp={self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """``[N, hidden]`` -> ``[N, vocab]`` logits on rank 0 (the whole vocabulary); the other ranks get their
    own slice ``[N, vocab / tp]`` back (they do not sample). float32 by default; ``forward(x, float32=False)``
    keeps the weights' dtype (a consumer that reads them in float32 itself saves the copy)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False):
        if bias:
            raise NotImplementedError("an LM head with a bias is not supported")
        super().__init__(num_embeddings, embedding_dim)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share ``embedding``'s table (tied word embeddings): one parameter, loaded once."""
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(f"cannot tie an LM head of {tuple(self.weight.shape)} to an embedding of "
                             f"{tuple(embedding.weight.shape)}")
        self.weight = embedding.weight

    def forward(self, x: torch.Tensor, float32: bool = True) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        if float32:
            logits = logits.float()
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
            dist.gather(logits, parts, dst=0)
            if self.tp_rank == 0:
                logits = torch.cat(parts, dim=-1)
        return logits

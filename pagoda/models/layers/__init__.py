"""Building blocks of the models: tensor-parallel linear/embedding layers, norms, activation, RoPE
settings, paged attention and the per-step forward context."""
from pagoda.models.layers.activation import SiluAndMul
from pagoda.models.layers.attention import KVCacheSpec, PagedAttention
from pagoda.models.layers.context import ForwardContext, forward_context, get_forward_context, set_forward_context
from pagoda.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda.models.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagoda.models.layers.norm import RMSNorm
from pagoda.models.layers.rotary import RopeConfig

__all__ = ["SiluAndMul", "KVCacheSpec", "PagedAttention", "ForwardContext", "forward_context", "get_forward_context",
           "set_forward_context", "ParallelLMHead", "VocabParallelEmbedding", "ColumnParallelLinear",
           "MergedColumnParallelLinear", "QKVParallelLinear", "ReplicatedLinear", "RowParallelLinear", "RMSNorm",
           "RopeConfig"]

"""One decoder-only transformer (pre-norm, GQA attention with RoPE, SwiGLU MLP) for the Llama family.

Llama, Qwen2, Qwen3 and Mistral differ only by flags (`DecoderOptions`): biases on the projections,
per-head q/k RMSNorm, a sliding window. Each architecture's file is a small subclass that reads its
flags from the Hugging Face config. Parameter names follow the Hugging Face checkpoints, except the
fused projections ``qkv_proj`` (q/k/v) and ``gate_up_proj`` (gate/up), which the loader fills through
``packed_modules_mapping``.

Shapes: ``T`` tokens of the step (all requests concatenated), ``hidden_size`` H.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagoda.models.layers import (
    KVCacheSpec,
    MergedColumnParallelLinear,
    PagedAttention,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RopeConfig,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
)

__all__ = ["DecoderOptions", "DecoderForCausalLM", "head_dim_of"]


@dataclass(slots=True, frozen=True)
class DecoderOptions:
    """How an architecture departs from plain Llama."""

    qkv_bias: bool = False       # bias on q/k/v projections (Qwen2; Llama/Qwen3 with attention_bias)
    o_bias: bool = False         # bias on the output projection (Llama/Qwen3 with attention_bias)
    mlp_bias: bool = False       # bias on gate/up/down (Llama with mlp_bias)
    qk_norm: bool = False        # RMSNorm over each q and k head before RoPE (Qwen3)
    sliding_window: int | None = None  # a query at p sees keys in (p - sliding_window, p] (Mistral)


def head_dim_of(config) -> int:
    """``config.head_dim`` when set, else ``hidden_size // num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderAttention(nn.Module):
    """``[T, H]`` -> ``[T, H]``: fused q/k/v projection, optional q/k norm, paged attention, output projection."""

    def __init__(self, config, opts: DecoderOptions, rope: RopeConfig):
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads, bias=opts.qkv_bias)
        # This rank's heads (KV heads replicated when there are fewer than ranks).
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=opts.o_bias)
        if opts.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = opts.qk_norm
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, rope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        o = self.attn(q, k, v)
        return self.o_proj(o.reshape(t, self.q_size))


class DecoderMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, ``[T, H]`` -> ``[T, H]``."""

    def __init__(self, config, opts: DecoderOptions):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=opts.mlp_bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=opts.mlp_bias)
        self.act_fn = SiluAndMul()
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {act!r} is not supported (the MLP is SwiGLU: 'silu')")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block; the residual stream travels beside the hidden state so each norm adds it first."""

    def __init__(self, config, opts: DecoderOptions, rope: RopeConfig):
        super().__init__()
        self.self_attn = DecoderAttention(config, opts, rope)
        self.mlp = DecoderMLP(config, opts)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x), residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embedding, the decoder layers and the final norm: ``[T]`` ids -> ``[T, H]``."""

    def __init__(self, config, opts: DecoderOptions):
        super().__init__()
        rope = RopeConfig.from_hf_config(config, head_dim_of(config))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, opts, rope) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual)
        x, _ = self.norm(x, residual)
        return x


class DecoderForCausalLM(nn.Module):
    """A causal LM on the paged KV cache, the interface the engine drives.

    Subclasses set ``options(config)``. ``forward(input_ids, positions)`` runs inside a
    `pagoda.models.layers.forward_context` whose ``positions`` are the same positions (the attention
    layers read them from there: one int32 copy per step, shared by every layer).
    """

    # checkpoint name component -> (parameter component, shard id for its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    @classmethod
    def options(cls, config) -> DecoderOptions:
        """The architecture's flags read from ``config``."""
        return DecoderOptions()

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.opts = self.options(config)
        self.model = DecoderModel(config, self.opts)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids int64 ``[T]``, positions int ``[T]`` (equal to the context's) -> hidden ``[T, H]``."""
        return self.model(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """hidden ``[N, H]`` (e.g. each request's last token) -> logits ``[N, vocab_size]`` (under tensor
        parallelism on rank 0; the other ranks get their vocabulary slice): float32, or with ``float32=False``
        the model's dtype."""
        return self.lm_head(hidden_states, float32=float32)

    def attention_layers(self) -> list[PagedAttention]:
        """The attention layers in layer order (the engine assigns each one's ``kv_cache``)."""
        return [layer.self_attn.attn for layer in self.model.layers]

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.model.layers[0].self_attn
        return KVCacheSpec(len(self.model.layers), attn.num_kv_heads, attn.head_dim,
                           self.model.embed_tokens.weight.dtype)

    @property
    def attn_plan_kwargs(self) -> dict:
        """What the engine passes to the wrappers' ``plan`` (with ``causal=True`` for prefill)."""
        window = self.opts.sliding_window
        return dict(sm_scale=head_dim_of(self.config) ** -0.5,
                    window_left=window - 1 if window is not None else -1, logits_soft_cap=None)


def uniform_sliding_window(config) -> int | None:
    """The one sliding window every layer uses (None: full attention).

    Read from ``config.layer_types`` when present (transformers 5), else ``sliding_window`` (with
    Qwen2's ``use_sliding_window``/``max_window_layers``). One attention plan serves all layers of a
    step, so layers with different windows are not supported.
    """
    window = getattr(config, "sliding_window", None)
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        per_layer = [None] * n
    elif types is not None:
        per_layer = [window if t == "sliding_attention" else None for t in types]
    elif hasattr(config, "max_window_layers"):
        per_layer = [window if i >= config.max_window_layers else None for i in range(n)]
    else:
        per_layer = [window] * n
    if len(set(per_layer)) > 1:
        raise NotImplementedError(f"layers with different sliding windows ({per_layer}) are not supported: one "
                                  "attention plan serves every layer of a step")
    w = per_layer[0] if per_layer else None
    if w is not None and (not isinstance(w, int) or w < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {w!r}")
    return w

"""Llama 2 / 3 / 3.1 / 3.2: optional attention and MLP biases, RoPE scaling "llama3", tied embeddings."""
from __future__ import annotations

from pagoda.models.decoder import DecoderForCausalLM, DecoderOptions

__all__ = ["LlamaForCausalLM"]


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def options(cls, config) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))

"""Qwen3: RMSNorm over each query and key head before RoPE; biases when ``attention_bias``."""
from __future__ import annotations

from pagoda.models.decoder import DecoderForCausalLM, DecoderOptions, uniform_sliding_window

__all__ = ["Qwen3ForCausalLM"]


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def options(cls, config) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=uniform_sliding_window(config))

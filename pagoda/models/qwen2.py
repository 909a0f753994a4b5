"""Qwen2 / Qwen2.5: bias on the q/k/v projections (not on o), sliding window when ``use_sliding_window``."""
from __future__ import annotations

from pagoda.models.decoder import DecoderForCausalLM, DecoderOptions, uniform_sliding_window

__all__ = ["Qwen2ForCausalLM"]


class Qwen2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def options(cls, config) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True, sliding_window=uniform_sliding_window(config))

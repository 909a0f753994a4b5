"""Mistral: Llama's block with a sliding window (a query at p sees keys in (p - sliding_window, p])."""
from __future__ import annotations

from pagoda.models.decoder import DecoderForCausalLM, DecoderOptions, uniform_sliding_window

__all__ = ["MistralForCausalLM"]


class MistralForCausalLM(DecoderForCausalLM):
    @classmethod
    def options(cls, config) -> DecoderOptions:
        return DecoderOptions(sliding_window=uniform_sliding_window(config))

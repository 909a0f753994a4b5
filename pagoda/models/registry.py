"""Model classes by Hugging Face architecture name (``config.architectures[0]``)."""
from __future__ import annotations

from pagoda.models.llama import LlamaForCausalLM
from pagoda.models.mistral import MistralForCausalLM
from pagoda.models.qwen2 import Qwen2ForCausalLM
from pagoda.models.qwen3 import Qwen3ForCausalLM

__all__ = ["MODEL_REGISTRY", "get_model_class"]

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(config) -> type:
    """The pagoda class of ``config.architectures[0]``; ValueError naming it and the supported ones."""
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ValueError(f"config.architectures is empty: cannot pick a model class (supported: "
                         f"{sorted(MODEL_REGISTRY)})")
    cls = MODEL_REGISTRY.get(archs[0])
    if cls is None:
        raise ValueError(f"architecture {archs[0]!r} is not supported; supported: {sorted(MODEL_REGISTRY)}")
    return cls

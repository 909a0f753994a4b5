"""pagoda's models on the paged KV cache: Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3 and Mistral, loaded from a
local Hugging Face folder (safetensors) or with dummy weights. See `DecoderForCausalLM` for the interface
the engine drives."""
from pagoda.models.decoder import DecoderForCausalLM, DecoderOptions
from pagoda.models.layers import ForwardContext, KVCacheSpec, PagedAttention, RopeConfig, forward_context
from pagoda.models.llama import LlamaForCausalLM
from pagoda.models.loader import build_model, checkpoint_files, init_dummy_weights, load_weights
from pagoda.models.mistral import MistralForCausalLM
from pagoda.models.qwen2 import Qwen2ForCausalLM
from pagoda.models.qwen3 import Qwen3ForCausalLM
from pagoda.models.registry import MODEL_REGISTRY, get_model_class

__all__ = ["DecoderForCausalLM", "DecoderOptions", "ForwardContext", "KVCacheSpec", "PagedAttention", "RopeConfig",
           "forward_context", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
           "build_model", "checkpoint_files", "init_dummy_weights", "load_weights", "MODEL_REGISTRY",
           "get_model_class"]

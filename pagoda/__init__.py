"""pagoda: FlashAttention/FlashInfer-class LLM-serving kernels in Python + Triton.

Every op runs on CUDA through Triton kernels compiled on first use, and anywhere else through a
plain-PyTorch reference path. The flash-attn 2 entry points and FlashInfer's wrappers, page, RoPE,
cascade, sampling, norm and activation ops are all exported here; the samplers also from `pagoda.sampling`.
The inference engine (`LLM`, `SamplingParams`, ...: `pagoda.engine`) is imported on first use.
"""
from pagoda import sampling
from pagoda.ops import *  # noqa: F401,F403  (the public API; see pagoda.ops.__all__)
from pagoda.ops import __all__ as _ops_all

__version__ = "0.1.0"
_ENGINE_NAMES = ("LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "StructuredOutputsParams")
__all__ = list(_ops_all) + ["sampling", "__version__", *_ENGINE_NAMES]


def __getattr__(name: str):
    # The engine (and the models, tokenizer and transformers behind it) loads only when asked for.
    if name in _ENGINE_NAMES:
        from pagoda import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")

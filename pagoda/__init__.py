"""pagoda: FlashAttention/FlashInfer-class LLM-serving kernels in Python + Triton.

Every op runs on CUDA through Triton kernels compiled on first use, and anywhere else through a
plain-PyTorch reference path. The flash-attn 2 entry points and FlashInfer's wrappers, page, RoPE,
cascade, sampling, norm and activation ops are all exported here; the samplers also from `pagoda.sampling`.
"""
from pagoda import sampling
from pagoda.ops import *  # noqa: F401,F403  (the public API; see pagoda.ops.__all__)
from pagoda.ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = list(_ops_all) + ["sampling", "__version__"]

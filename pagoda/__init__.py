"""pagoda: FlashAttention/FlashInfer-class LLM-serving kernels in Python + Triton.

Every op runs on CUDA through Triton kernels compiled on first use, and anywhere else through a
plain-PyTorch reference path.
"""
from pagoda.ops.attention import flash_attn_func, flash_attn_varlen_func
from pagoda.ops.cascade import merge_state, merge_state_in_place, merge_states

__version__ = "0.1.0"
__all__ = ["flash_attn_func", "flash_attn_varlen_func", "merge_state", "merge_state_in_place", "merge_states",
           "__version__"]

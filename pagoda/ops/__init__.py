"""Public kernel API: validation and dispatch (Triton on CUDA, the PyTorch reference elsewhere)."""
from pagoda.ops.attention import flash_attn_func, flash_attn_varlen_func

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]

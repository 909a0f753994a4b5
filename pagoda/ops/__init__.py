"""Public kernel API: validation and dispatch (Triton on CUDA, the PyTorch reference elsewhere)."""
from pagoda.ops.attention import flash_attn_func, flash_attn_varlen_func
from pagoda.ops.cascade import merge_state, merge_state_in_place, merge_states

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "merge_state", "merge_state_in_place", "merge_states"]

"""``pagoda.rope``: the RoPE ops under the module path FlashInfer users know (``flashinfer.rope``).

A re-export of `pagoda.ops.rope` (positions computed on the fly) and `pagoda.ops.rope_table` (precomputed
cos/sin tables: ``apply_rope_with_cos_sin_cache``, the entry point vLLM and SGLang call); see there for semantics.
"""
from pagoda.ops.rope import (
    apply_llama31_rope,
    apply_llama31_rope_inplace,
    apply_llama31_rope_pos_ids,
    apply_llama31_rope_pos_ids_inplace,
    apply_rope,
    apply_rope_inplace,
    apply_rope_pos_ids,
    apply_rope_pos_ids_inplace,
)
from pagoda.ops.rope_table import apply_rope_with_cos_sin_cache, apply_rope_with_cos_sin_cache_inplace

__all__ = [
    "apply_rope", "apply_rope_inplace", "apply_rope_pos_ids", "apply_rope_pos_ids_inplace", "apply_llama31_rope",
    "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids", "apply_llama31_rope_pos_ids_inplace",
    "apply_rope_with_cos_sin_cache", "apply_rope_with_cos_sin_cache_inplace",
]

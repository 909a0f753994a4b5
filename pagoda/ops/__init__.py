"""Public kernel API: validation and dispatch (Triton on CUDA, the PyTorch reference elsewhere)."""
from pagoda.ops.activation import gelu_and_mul, gelu_tanh_and_mul, silu_and_mul
from pagoda.ops.attention import flash_attn_func, flash_attn_varlen_func
from pagoda.ops.attention_packed import (
                             flash_attn_kvpacked_func,
                             flash_attn_qkvpacked_func,
                             flash_attn_varlen_kvpacked_func,
                             flash_attn_varlen_qkvpacked_func,
)
from pagoda.ops.bert_padding import pad_input, unpad_input
from pagoda.ops.cascade import MultiLevelCascadeAttentionWrapper, merge_state, merge_state_in_place, merge_states
from pagoda.ops.cascade_levels import CascadeLevels, build_cascade_levels
from pagoda.ops.cascade_shared import (
                             BatchDecodeWithSharedPrefixPagedKVCacheWrapper,
                             BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
)
from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper, single_decode_with_kv_cache
from pagoda.ops.decode_graph import CUDAGraphBatchDecodeWithPagedKVCacheWrapper, fast_decode_plan
from pagoda.ops.kvcache import flash_attn_with_kvcache
from pagoda.ops.norm import fused_add_rmsnorm, gemma_fused_add_rmsnorm, gemma_rmsnorm, rmsnorm
from pagoda.ops.packbits import packbits, segment_packbits
from pagoda.ops.page import (
                             append_paged_kv_cache,
                             append_paged_kv_cache_with_rope,
                             block_table_to_csr,
                             csr_to_block_table,
                             get_batch_indices_positions,
                             get_seq_lens,
)
from pagoda.ops.prefill import (
                             BatchPrefillWithPagedKVCacheWrapper,
                             BatchPrefillWithRaggedKVCacheWrapper,
                             single_prefill_with_kv_cache,
)
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
from pagoda.ops.rope_table import (
                             apply_rope_with_cos_sin_cache,
                             apply_rope_with_cos_sin_cache_inplace,
                             apply_rotary_emb,
)
from pagoda.ops.sampling import (
                             chain_speculative_sampling,
                             min_p_sampling_from_probs,
                             sampling_from_logits,
                             sampling_from_probs,
                             softmax,
                             top_k_mask_logits,
                             top_k_renorm_probs,
                             top_k_sampling_from_probs,
                             top_k_top_p_sampling_from_logits,
                             top_k_top_p_sampling_from_probs,
                             top_p_renorm_probs,
                             top_p_sampling_from_probs,
)

__all__ = [
    "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
    "unpad_input", "pad_input", "softmax",
    "merge_state", "merge_state_in_place", "merge_states", "MultiLevelCascadeAttentionWrapper",
    "CascadeLevels", "build_cascade_levels",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper", "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
    "BatchDecodeWithPagedKVCacheWrapper", "single_decode_with_kv_cache",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper", "fast_decode_plan",
    "BatchPrefillWithPagedKVCacheWrapper", "BatchPrefillWithRaggedKVCacheWrapper", "single_prefill_with_kv_cache",
    "packbits", "segment_packbits",
    "append_paged_kv_cache", "append_paged_kv_cache_with_rope", "block_table_to_csr", "csr_to_block_table",
    "get_batch_indices_positions", "get_seq_lens",
    "apply_rope", "apply_rope_inplace", "apply_rope_pos_ids", "apply_rope_pos_ids_inplace", "apply_llama31_rope",
    "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids", "apply_llama31_rope_pos_ids_inplace",
    "apply_rope_with_cos_sin_cache", "apply_rope_with_cos_sin_cache_inplace", "apply_rotary_emb",
    "sampling_from_logits", "sampling_from_probs", "top_p_sampling_from_probs", "top_k_sampling_from_probs",
    "min_p_sampling_from_probs", "top_k_top_p_sampling_from_logits", "top_k_top_p_sampling_from_probs",
    "top_p_renorm_probs", "top_k_renorm_probs", "top_k_mask_logits", "chain_speculative_sampling",
    "rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm",
    "silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul",
]

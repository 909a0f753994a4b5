"""``pagoda.sampling``: the samplers under the module path FlashInfer users know (``flashinfer.sampling``).

A re-export of `pagoda.ops.sampling`; see there for the semantics.
"""
from pagoda.ops.sampling import (
    chain_speculative_sampling,
    min_p_sampling_from_probs,
    sampling_from_logits,
    sampling_from_probs,
    softmax,
    top_k_mask_logits,
    top_k_renorm_prob,
    top_k_renorm_probs,
    top_k_sampling_from_probs,
    top_k_top_p_sampling_from_logits,
    top_k_top_p_sampling_from_probs,
    top_p_renorm_prob,
    top_p_renorm_probs,
    top_p_sampling_from_probs,
)

__all__ = [
    "softmax", "sampling_from_logits", "sampling_from_probs", "top_p_sampling_from_probs",
    "top_k_sampling_from_probs", "min_p_sampling_from_probs", "top_k_top_p_sampling_from_logits",
    "top_k_top_p_sampling_from_probs", "top_p_renorm_probs", "top_p_renorm_prob", "top_k_renorm_probs",
    "top_k_renorm_prob", "top_k_mask_logits", "chain_speculative_sampling",
]

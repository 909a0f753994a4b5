"""Exclusion rules of the conformance harness: what is outside pagoda's claim, decided from ids/params."""
import pytest
from classify import exclusions, outcome


@pytest.mark.parametrize("function, params, want", [
    ("test_flash_attn_output", {"d": 64, "dropout_p": 0.0, "dtype": "torch.float16"}, []),
    ("test_flash_attn_output", {"d": 64, "dropout_p": 0.17}, ["dropout"]),
    ("test_flash_attn_output", {"d": 59, "dropout_p": 0.0}, ["head_dim % 8"]),
    ("test_flash_attn_output", {"d": 59, "dropout_p": 0.17}, ["dropout", "head_dim % 8"]),
    ("test_flash_attn_bwd_overflow", {"d": 64}, ["backward"]),
    ("test_flash_attn_deterministic", {"d": 64}, ["deterministic backward"]),
    ("test_batch_decode_with_paged_kv_cache", {"kv_dtype": "torch.float8_e4m3fn", "head_dim": 128}, ["fp8"]),
    ("test_batch_decode_with_paged_kv_cache", {"kv_dtype": "torch.float16", "head_dim": 512}, ["head_dim > 256"]),
    ("test_batch_prefill_with_paged_kv_cache_head_dim_512", {}, ["head_dim > 256"]),
    ("test_batch_prefill_with_paged_kv_cache_nvfp4", {"head_dim": 128}, ["nvfp4"]),
    ("test_rope_quantize_fp8_append_paged_kv_cache_decode", {}, ["fp8"]),
    ("test_mla_rope_quantize", {}, ["fp8", "MLA"]),  # the first reason is the one counted
    ("test_single_prefill_reference_correctness", {"shape_kwargs": {"head_dim": 64, "qo_len": 7}}, []),
    ("test_single_prefill_reference_correctness", {"shape_kwargs": {"head_dim": 100}}, ["head_dim % 8"]),
    ("test_x", {"head_dim_qk": 192, "head_dim_vo": 128}, ["MLA"]),
    # flags named like a dim but boolean, and unrelated numbers, are not head dims
    ("test_batch_decode_tensor_cores", {"head_dim": 128, "page_size": 1, "causal": True}, []),
    ("test_top_k_renorm_probs", {"k": 10, "vocab_size": 111, "dtype": "torch.bfloat16"}, []),
])
def test_exclusions(function, params, want):
    assert exclusions(function, params) == want


@pytest.mark.parametrize("raw, reason, want", [
    ("passed", None, "passed"),
    ("passed_fwd", None, "passed_fwd"),
    ("error", None, "failed"),
    ("skipped", "single_prefill kernel unavailable: TypeError: x", "failed"),  # the suite hid an error
    ("skipped", "Skipping due to OOM", "skipped_oom"),
    ("skipped", "Causal attention requires q_len <= kv_len", "skipped"),
])
def test_outcome(raw, reason, want):
    assert outcome(raw, reason) == want


def test_outcome_rejects_unknown():
    with pytest.raises(ValueError, match="raw"):
        outcome("xpassed")

"""Bad inputs to the flash-attn entry points: clear TypeError/ValueError naming the argument (CPU path)."""
import pytest
import torch

import pagoda


def _qkv(b=2, sq=4, sk=5, hq=4, hk=2, d=16):
    return torch.randn(b, sq, hq, d), torch.randn(b, sk, hk, d), torch.randn(b, sk, hk, d)


def test_flash_attn_func_batch_zero_returns_empty():
    q, k, v = _qkv(b=0)
    out, lse, _ = pagoda.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == (0, 4, 4, 16) and lse.shape == (0, 4, 4)
    assert pagoda.flash_attn_func(q, k, v).shape == (0, 4, 4, 16)


@pytest.mark.parametrize("name", ["softmax_scale", "softcap"])
def test_flash_attn_func_bool_float_options(name):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=name):
        pagoda.flash_attn_func(q, k, v, **{name: True})


def test_flash_attn_varlen_bool_max_seqlen():
    q, k = torch.randn(7, 4, 16), torch.randn(9, 2, 16)
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(TypeError, match="max_seqlen_q"):
        pagoda.flash_attn_varlen_func(q, k, k, cu_q, cu_k, True, 5)


@pytest.mark.parametrize("bad", [3.0, [3, 4], True])
def test_kvcache_cache_seqlens_scalar_type(bad):
    q, kc, vc = torch.randn(2, 1, 4, 16), torch.randn(3, 8, 2, 16), torch.randn(3, 8, 2, 16)
    with pytest.raises(TypeError, match="cache_seqlens"):
        pagoda.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=bad)


def test_kvcache_duplicate_cache_batch_idx_when_appending():
    q, kc, vc = torch.randn(2, 1, 4, 16), torch.zeros(3, 8, 2, 16), torch.zeros(3, 8, 2, 16)
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    idx = torch.tensor([0, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_batch_idx"):
        pagoda.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=3, cache_batch_idx=idx)
    assert not kc.any() and not vc.any()  # nothing written
    # Reading one cache row from two sequences (no append) stays allowed.
    pagoda.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, cache_batch_idx=idx)

"""RoPE from precomputed cos/sin tables: FlashInfer's `apply_rope_with_cos_sin_cache(_inplace)` (vLLM/SGLang's entry
point) and flash-attn's `apply_rotary_emb`, against float64 oracles written from the peers' documented semantics, on
the reference path and the Triton kernel (interpreter, fp16/fp32)."""
import inspect
import math

import pytest
import torch

import pagoda
from tests.helpers import rel_err


def _rotate64(x, cos, sin, interleave):
    """Oracle: ``x [n, H, D]`` with per-token ``cos, sin [n, rd/2]`` (float64), pairs as documented by the peers."""
    x = x.double()
    half = cos.shape[1]
    rd = 2 * half
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    out = x.clone()
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleave else (i, i + half)
        out[..., a] = x[..., a] * c[..., i] - x[..., b] * s[..., i]
        out[..., b] = x[..., b] * c[..., i] + x[..., a] * s[..., i]
    assert torch.equal(out[..., rd:], x[..., rd:])
    return out


def _cache(max_pos, rd, base=1e4):
    """vLLM's cos_sin_cache: float32 [max_pos, rd], cos in the first half of each row, sin in the second."""
    inv = 1.0 / base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], -1).float()


def test_signatures_match_the_peers():
    assert list(inspect.signature(pagoda.apply_rope_with_cos_sin_cache).parameters) == [
        "positions", "query", "key", "head_size", "cos_sin_cache", "is_neox"]
    assert inspect.signature(pagoda.apply_rope_with_cos_sin_cache).parameters["is_neox"].default is True
    assert list(inspect.signature(pagoda.apply_rope_with_cos_sin_cache_inplace).parameters) == [
        "positions", "query", "key", "head_size", "cos_sin_cache", "is_neox"]
    assert list(inspect.signature(pagoda.apply_rotary_emb).parameters) == [
        "x", "cos", "sin", "interleaved", "inplace", "seqlen_offsets", "cu_seqlens", "max_seqlen"]
    from pagoda import rope
    assert rope.apply_rope_with_cos_sin_cache is pagoda.apply_rope_with_cos_sin_cache


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rd,dtype", [(64, 64, torch.float32), (80, 32, torch.float16),
                                                (48, 16, torch.float32)])
def test_cos_sin_cache_matches_oracle(kernel, is_neox, head_size, rd, dtype, monkeypatch):
    if kernel:
        from pagoda import _switches
        monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    nnz, hq, hk, max_pos = 11, 3, 2, 97
    cache = _cache(max_pos, rd)
    pos = torch.randint(0, max_pos, (nnz,), dtype=torch.int64)
    q = torch.randn(nnz, hq * head_size, dtype=dtype)
    k = torch.randn(nnz, hk * head_size, dtype=dtype)
    q0, k0 = q.clone(), k.clone()
    qo, ko = pagoda.apply_rope_with_cos_sin_cache(pos, q, k, head_size, cache, is_neox)
    assert torch.equal(q, q0) and torch.equal(k, k0)            # not in place
    assert qo.shape == q.shape and ko.dtype == dtype
    cos, sin = cache[pos, : rd // 2], cache[pos, rd // 2:]
    want_q = _rotate64(q.view(nnz, hq, head_size), cos, sin, not is_neox).view(nnz, -1)
    want_k = _rotate64(k.view(nnz, hk, head_size), cos, sin, not is_neox).view(nnz, -1)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert rel_err(qo, want_q) < tol and rel_err(ko, want_k) < tol
    pagoda.apply_rope_with_cos_sin_cache_inplace(pos.to(torch.int32), q, k, head_size, cache, is_neox)
    assert torch.equal(q, qo) and torch.equal(k, ko)


def test_cos_sin_cache_rotates_vllm_style_3d_input_and_checks_arguments():
    nnz, h, d = 5, 2, 32
    cache = _cache(16, d)
    pos = torch.arange(nnz)
    q, k = torch.randn(nnz, h, d), torch.randn(nnz, 1, d)
    qo, ko = pagoda.apply_rope_with_cos_sin_cache(pos, q, k, d, cache)
    q2, _ = pagoda.apply_rope_with_cos_sin_cache(pos, q.reshape(nnz, -1), k.reshape(nnz, -1), d, cache)
    assert qo.shape == q.shape and torch.equal(qo.reshape(nnz, -1), q2)
    with pytest.raises(ValueError, match="cos_sin_cache should be float32"):
        pagoda.apply_rope_with_cos_sin_cache(pos, q, k, d, cache.half())
    with pytest.raises(ValueError, match="head_size"):
        pagoda.apply_rope_with_cos_sin_cache(pos, q.reshape(nnz, -1), k.reshape(nnz, -1), 24, cache)
    with pytest.raises(ValueError, match="rotary_dim"):
        pagoda.apply_rope_with_cos_sin_cache(pos, q, k, d, _cache(16, 2 * d))
    with pytest.raises(ValueError, match="positions"):
        pagoda.apply_rope_with_cos_sin_cache(pos[:3], q, k, d, cache)
    with pytest.raises(TypeError, match="positions"):
        pagoda.apply_rope_with_cos_sin_cache(pos.float(), q, k, d, cache)
    with pytest.raises(ValueError, match="query"):
        pagoda.apply_rope_with_cos_sin_cache_inplace(pos, q.transpose(1, 2), k, d, cache)


@pytest.mark.parametrize("kernel", [False, True])
def test_position_outside_the_table_rotates_by_zero(kernel, monkeypatch):
    if kernel:
        from pagoda import _switches
        monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    cache = _cache(8, 16)
    q, k = torch.randn(3, 16), torch.randn(3, 16)
    qo, ko = pagoda.apply_rope_with_cos_sin_cache(torch.tensor([2, 8, 100]), q, k, 16, cache)
    assert torch.equal(qo[1:], q[1:]) and torch.equal(ko[1:], k[1:])
    assert not torch.allclose(qo[0], q[0])


def _rotary_oracle(x, cos, sin, interleaved, pos):
    """flash-attn's apply_rotary_emb in float64 for ``x [n, H, D]`` at table rows ``pos [n]``."""
    return _rotate64(x, cos.double()[pos], sin.double()[pos], interleaved)


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tensor_offsets", [False, True])
def test_apply_rotary_emb_batch_form(kernel, interleaved, tensor_offsets, monkeypatch):
    if kernel:
        from pagoda import _switches
        monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    b, s, h, d, rd, ro = 3, 6, 2, 64, 32, 20
    ang = torch.rand(ro, rd // 2, dtype=torch.float64) * 2 * math.pi
    cos, sin = ang.cos().float(), ang.sin().float()
    x = torch.randn(b, s, h, d)
    offsets = torch.tensor([0, 5, 14], dtype=torch.int32) if tensor_offsets else 4
    out = pagoda.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    off = offsets.long() if tensor_offsets else torch.full((b,), offsets)
    pos = (torch.arange(s)[None, :] + off[:, None]).reshape(-1)
    want = _rotary_oracle(x.reshape(b * s, h, d), cos, sin, interleaved, pos).view(b, s, h, d)
    assert rel_err(out, want) < 1e-5
    # A strided (non-contiguous) input and the in-place form agree.
    xt = torch.randn(b, h, s, d).transpose(1, 2)
    torch.testing.assert_close(pagoda.apply_rotary_emb(xt, cos, sin, interleaved, seqlen_offsets=offsets),
                               _rotary_oracle(xt.reshape(b * s, h, d), cos, sin, interleaved, pos)
                               .view(b, s, h, d).float(), rtol=1e-5, atol=1e-5)
    y = x.clone()
    assert pagoda.apply_rotary_emb(y, cos, sin, interleaved, inplace=True, seqlen_offsets=offsets) is y
    assert torch.equal(y, out)


@pytest.mark.parametrize("kernel", [False, True])
def test_apply_rotary_emb_varlen_form(kernel, monkeypatch):
    if kernel:
        from pagoda import _switches
        monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    lens, h, d, rd = [3, 0, 5], 2, 32, 32
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    x = torch.randn(10, h, d, dtype=torch.float16)      # two rows past cu[-1]: left as they are
    ang = torch.rand(16, rd // 2) * 6
    cos, sin = ang.cos().half(), ang.sin().half()
    offsets = torch.tensor([2, 7, 1])
    out = pagoda.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=max(lens))
    pos = torch.tensor([2, 3, 4, 1, 2, 3, 4, 5])
    want = _rotary_oracle(x[:8], cos, sin, False, pos)
    assert rel_err(out[:8], want) < 2e-3
    assert torch.equal(out[8:], x[8:])
    with pytest.raises(ValueError, match="max_seqlen"):
        pagoda.apply_rotary_emb(x, cos, sin, cu_seqlens=cu)


def test_apply_rotary_emb_refuses_what_flash_attn_asserts():
    x = torch.randn(2, 4, 2, 16)
    cos = sin = torch.ones(8, 8)
    with pytest.raises(ValueError, match="rotary_dim"):
        pagoda.apply_rotary_emb(x, torch.ones(8, 9), torch.ones(8, 9))
    with pytest.raises(ValueError, match="seqlen_ro"):
        pagoda.apply_rotary_emb(x, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="seqlen_offsets"):
        pagoda.apply_rotary_emb(x, cos, sin, seqlen_offsets=6)
    with pytest.raises(ValueError, match="seqlen_offsets"):
        pagoda.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="same shape"):
        pagoda.apply_rotary_emb(x, cos, sin[:, :4])

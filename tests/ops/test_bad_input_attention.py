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


def test_cu_seqlens_read_once_per_tensor(monkeypatch):
    """The layers of one forward share cu_seqlens: the host read (a device sync on CUDA) happens once per
    tensor and version, an in-place edit is read (and checked) again, a new tensor is read."""
    from pagoda.ops import _checks
    reads = []
    real = _checks._host_values
    monkeypatch.setattr(_checks, "_host_values", lambda cu: reads.append(cu) or real(cu))
    q = torch.randn(9, 2, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    first = pagoda.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, causal=True)
    assert len(reads) == 1  # cu_seqlens_q and cu_seqlens_k are one tensor with the same bounds
    for _ in range(3):
        assert torch.equal(pagoda.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, causal=True), first)
    assert len(reads) == 1
    cu[1] = 10  # in place: bumps the version counter, so it is checked again
    with pytest.raises(ValueError, match="non-decreasing"):
        pagoda.flash_attn_varlen_func(q, q, q, cu, cu, 10, 10)
    assert len(reads) == 2
    cu2 = torch.tensor([0, 4, 9], dtype=torch.int32)
    pagoda.flash_attn_varlen_func(q, q, q, cu2, cu2, 5, 5)
    assert len(reads) == 3
    with pytest.raises(ValueError, match="max_seqlen_q"):  # another bound is another check
        pagoda.flash_attn_varlen_func(q, q, q, cu2, cu2, 4, 5)
    assert len(reads) == 4


def test_cu_seqlens_memo_is_off_under_torch_compile(monkeypatch):
    """While Dynamo traces, the memo is neither read nor written (it would guard on remembered tensors, which
    under CUDA graphs may be overwritten outputs of an earlier replay): every call is checked on its values."""
    from pagoda.ops import _checks
    reads = []
    real = _checks._host_values
    monkeypatch.setattr(_checks, "_host_values", lambda cu: reads.append(cu) or real(cu))
    monkeypatch.setattr(_checks, "_CU_CHECKED", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q = torch.randn(9, 2, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    for _ in range(2):
        pagoda.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, causal=True)
    assert _checks._CU_CHECKED == {} and len(reads) == 4


def test_cu_seqlens_inference_tensors_failed_checks_are_not_remembered():
    """Inference tensors have no version counter (a passed check is then trusted by identity): a failed check
    is not remembered, so the same bad tensor raises again, and a good one runs."""
    q = torch.randn(9, 2, 16)
    with torch.inference_mode():
        bad = torch.tensor([0, 5, 4], dtype=torch.int32)
        with pytest.raises(ValueError, match="non-decreasing"):
            pagoda.flash_attn_varlen_func(q, q, q, bad, bad, 5, 5)
        with pytest.raises(ValueError, match="non-decreasing"):  # a failed check is not remembered
            pagoda.flash_attn_varlen_func(q, q, q, bad, bad, 5, 5)
        good = torch.tensor([0, 4, 9], dtype=torch.int32)
        out = pagoda.flash_attn_varlen_func(q, q, q, good, good, 5, 5)
        assert out.shape == q.shape


def _full_checks(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes):
    """What `flash_attn_func` runs when `plain_dense_call` is False: (window_left, window_right) or raises."""
    from pagoda.ops import _checks
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, t, ndim=4)
    _checks.check_attention_dtypes(q, k, v)
    _checks.check_head_dims(q, k, v)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0] or v.shape[1] != k.shape[1]:
        raise ValueError("batch / seqlen_k")
    left_right = _checks.check_options(dropout_p, softmax_scale, causal, window_size, softcap)
    _checks.check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    return left_right


def test_plain_dense_call_accepts_only_what_the_checks_accept():
    """The checks' shortcut (`_checks.plain_dense_call`) over random argument sets, good and bad: whenever it
    says "plain", the full checks pass and give the window it implies; it says "plain" for the ordinary call."""
    import random

    from pagoda.ops import _checks
    rng = random.Random(0)
    shapes = [(2, 5, 4, 64), (2, 7, 2, 64), (2, 7, 3, 64), (1, 5, 4, 64), (2, 5, 4, 60), (2, 5, 4, 264), (2, 5, 4, 0),
              (2, 5, 0, 64), (2, 5, 4, 128), (5, 4, 64), (2, 5, 1, 64)]
    values = dict(dropout_p=[0.0, 0, 0.1, False, -0.0, "0", None], softmax_scale=[None, 0.125, 1, 0.0, -1.0,
                  float("inf"), float("nan"), True, "x"], causal=[False, True, 0, 1, None],
                  window_size=[(-1, -1), (-1, -1), [-1, -1], (-1, 0), (4, 0), (-1,), (-2, -1), (True, -1)],
                  softcap=[0.0, 0, 5.0, -1.0, False, float("nan")], alibi_slopes=[None, None, torch.ones(4)])
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    plain = 0
    for _ in range(3000):
        q = torch.empty(rng.choice(shapes[:-2]), dtype=rng.choice(dtypes))
        k = torch.empty(q.shape if rng.random() < 0.6 else rng.choice(shapes),
                        dtype=q.dtype if rng.random() < 0.7 else rng.choice(dtypes))
        v = k if rng.random() < 0.7 else torch.empty(rng.choice(shapes), dtype=rng.choice(dtypes))
        # Mostly the ordinary values (the first two of each list), so that many draws are plain.
        opts = {name: rng.choice(vals[:2] if rng.random() < 0.8 else vals) for name, vals in values.items()}
        if _checks.plain_dense_call(q, k, v, **opts):
            plain += 1
            assert _full_checks(q, k, v, **opts) == (-1, 0 if opts["causal"] else -1), opts
    assert plain > 20
    q = torch.empty(2, 5, 4, 64, dtype=torch.bfloat16)
    assert _checks.plain_dense_call(q, q, q, 0.0, None, True, (-1, -1), 0.0, None)
    assert not _checks.plain_dense_call(q.float(), q.float(), q.float(), 0.0, None, True, (-1, -1), 0.0, None)

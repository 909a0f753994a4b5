"""flash-attn 2.8's call forms: window_size as a tuple, list or tensor; causal=True clamping the right window; window
bounds >= seqlen_k meaning unbounded; the packed entry points; flash_attn_varlen_func(..., block_table=) over a paged
cache of any page size; bert_padding's unpad_input / pad_input. Oracles: float64 attention written from flash-attn's
documented semantics (bottom-right alignment, ALiBi ``-slope * |i + sk - sq - j|``, natural-log LSE). The paged call
also runs on the kernel under the interpreter (``TRITON_INTERPRET=1``; fp16, fp32).
"""
import math
import os

import pytest
import torch

import pagoda
from pagoda import _switches

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _oracle(q, k, v, causal=False, window=(-1, -1), alibi=None, softcap=0.0):
    """One sequence, float64, flash-attn's semantics with its clamps: q ``[sq, H, D]``, k/v ``[sk, Hk, D]`` ->
    out ``[sq, H, D]``, LSE ``[H, sq]`` (natural log; -inf for rows that see nothing)."""
    sq, h, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    left, right = window
    left = -1 if left >= sk else left
    right = -1 if right >= sk else right
    if causal:
        right = 0
    kd, vd = k.double().repeat_interleave(h // hk, 1), v.double().repeat_interleave(h // hk, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kd) * d ** -0.5
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    if alibi is not None:
        s = s - alibi.double()[:, None, None] * (i - j).abs()
    hidden = torch.zeros(sq, sk, dtype=torch.bool)
    if left >= 0:
        hidden |= j < i - left
    if right >= 0:
        hidden |= j > i + right
    s = s.masked_fill(hidden, -math.inf)
    lse = torch.logsumexp(s, -1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1).nan_to_num(0.0), vd), lse


@pytest.mark.parametrize("form", ["tuple", "list", "tensor"])
@pytest.mark.parametrize("causal,window", [(False, (3, 2)), (True, (5, 4)), (True, (-1, 7)), (False, (40, 30))])
def test_window_forms_and_clamps(form, causal, window):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 24, 4, 32), torch.randn(1, 9, 2, 32), torch.randn(1, 9, 2, 32)
    ws = {"tuple": tuple(window), "list": list(window), "tensor": torch.tensor(window)}[form]
    out, lse, _ = pagoda.flash_attn_func(q, k, v, causal=causal, window_size=ws, return_attn_probs=True)
    want, want_lse = _oracle(q[0], k[0], v[0], causal, window)
    torch.testing.assert_close(out[0].double(), want, atol=1e-5, rtol=1e-5)
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[0].double()[fin], want_lse[fin], atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[0][~fin]).all()


def test_window_tensor_from_randint_and_bad_forms():
    q = k = v = torch.randn(1, 6, 2, 16)
    w = torch.randint(0, 6, (2,))   # what flash-attn's tests pass
    torch.testing.assert_close(pagoda.flash_attn_func(q, k, v, window_size=w),
                               pagoda.flash_attn_func(q, k, v, window_size=(int(w[0]), int(w[1]))))
    for bad in ((1, 2, 3), (1.5, 2), torch.tensor([1.0, 2.0]), "ab", (True, 1)):
        with pytest.raises(ValueError, match="window_size"):
            pagoda.flash_attn_func(q, k, v, window_size=bad)


def test_packed_forms_equal_the_oracle():
    torch.manual_seed(1)
    qkv = torch.randn(2, 10, 3, 4, 32)
    out = pagoda.flash_attn_qkvpacked_func(qkv, causal=True)
    for b in range(2):
        want, _ = _oracle(qkv[b, :, 0], qkv[b, :, 1], qkv[b, :, 2], causal=True)
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)
    q, kv = torch.randn(2, 7, 4, 32), torch.randn(2, 12, 2, 2, 32)
    out, lse, probs = pagoda.flash_attn_kvpacked_func(q, kv, window_size=(3, 1), return_attn_probs=True)
    assert probs is None and lse.shape == (2, 4, 7)
    for b in range(2):
        want, want_lse = _oracle(q[b], kv[b, :, 0], kv[b, :, 1], window=(3, 1))
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b].double(), want_lse, atol=1e-5, rtol=1e-5)
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
    qkv = torch.randn(11, 3, 4, 32)
    out = pagoda.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, causal=True)
    kv = torch.randn(11, 2, 2, 32)
    out2 = pagoda.flash_attn_varlen_kvpacked_func(qkv[:, 0], kv, cu, cu, 7, 7, causal=True)
    for a, b in ((0, 4), (4, 11)):
        want, _ = _oracle(qkv[a:b, 0], qkv[a:b, 1], qkv[a:b, 2], causal=True)
        torch.testing.assert_close(out[a:b].double(), want, atol=1e-5, rtol=1e-5)
        want2, _ = _oracle(qkv[a:b, 0], kv[a:b, 0], kv[a:b, 1], causal=True)
        torch.testing.assert_close(out2[a:b].double(), want2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="qkv"):
        pagoda.flash_attn_qkvpacked_func(torch.randn(2, 10, 2, 4, 32))


def test_unpad_and_pad_input():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 2, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    unused = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    flat, idx, cu, max_len, used = pagoda.unpad_input(x, mask)
    assert cu.tolist() == [0, 3, 3, 8] and cu.dtype == torch.int32 and max_len == 5 and used.tolist() == [3, 0, 5]
    torch.testing.assert_close(flat, torch.cat([x[0, :3], x[2]]))
    back = pagoda.pad_input(flat, idx, 3, 5)
    torch.testing.assert_close(back, x * mask[..., None, None])
    flat, idx, cu, max_len, used = pagoda.unpad_input(x, mask, unused)
    assert cu.tolist() == [0, 4, 4, 9] and used.tolist() == [3, 0, 5]


def _paged_case(lens, page_size, dtype, seed=3):
    torch.manual_seed(seed)
    hk, d = 2, 32
    width = max(-(-n // page_size) for n in lens)
    blocks = len(lens) * width + 3
    k_cache, v_cache = torch.randn(blocks, page_size, hk, d, dtype=dtype), torch.randn(blocks, page_size, hk, d,
                                                                                      dtype=dtype)
    block_table = torch.randperm(blocks, dtype=torch.int32)[:len(lens) * width].view(len(lens), width)
    keys = [k_cache[block_table[b].long()].reshape(-1, hk, d)[:n] for b, n in enumerate(lens)]
    vals = [v_cache[block_table[b].long()].reshape(-1, hk, d)[:n] for b, n in enumerate(lens)]
    return k_cache, v_cache, block_table, keys, vals


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("page_size,opts", [(3, dict(causal=True)), (16, dict(window_size=(5, 2))),
                                            (5, dict(causal=True, alibi=True, softcap=8.0))])
def test_varlen_block_table(monkeypatch, kernel, dtype, page_size, opts):
    if kernel:
        if not INTERPRET:
            pytest.skip("the kernel path runs on the CPU only under TRITON_INTERPRET=1")
        monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    k_lens, q_lens = [20, 7, 0, 33], [6, 7, 0, 11]
    k_cache, v_cache, block_table, keys, vals = _paged_case(k_lens, page_size, dtype)
    q = torch.randn(sum(q_lens) + 2, 4, 32, dtype=dtype)          # two padding rows past cu_seqlens_q[-1]
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    slopes = torch.rand(4) if opts.get("alibi") else None
    out, lse, _ = pagoda.flash_attn_varlen_func(
        q, k_cache, v_cache, cu_q, cu_k, max(q_lens), max(k_lens), causal=opts.get("causal", False),
        window_size=opts.get("window_size", (-1, -1)), softcap=opts.get("softcap", 0.0), alibi_slopes=slopes,
        return_attn_probs=True, block_table=block_table)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    for b in range(len(k_lens)):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        if q_lens[b] == 0:
            continue
        want, want_lse = _oracle(q[rows], keys[b], vals[b], opts.get("causal", False),
                                 opts.get("window_size", (-1, -1)), slopes, opts.get("softcap", 0.0))
        torch.testing.assert_close(out[rows].double(), want, atol=tol, rtol=tol)
        fin = torch.isfinite(want_lse)
        torch.testing.assert_close(lse[:, rows].double()[fin], want_lse[fin], atol=10 * tol, rtol=tol)
    assert (out[-2:] == 0).all() and torch.isneginf(lse[:, -2:]).all()


def test_varlen_block_table_bad_input():
    k_cache, v_cache, block_table, _, _ = _paged_case([8, 4], 4, torch.float32)
    q = torch.randn(5, 4, 32)
    cu_q = torch.tensor([0, 3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="more than block_table"):
        pagoda.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, torch.tensor([0, 9, 13], dtype=torch.int32), 3, 9,
                                      block_table=block_table)
    with pytest.raises(TypeError, match="block_table"):
        pagoda.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, torch.tensor([0, 8, 12], dtype=torch.int32), 3, 8,
                                      block_table=block_table.long())
    with pytest.raises(ValueError, match="block_table must have 2 rows"):
        pagoda.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, torch.tensor([0, 8, 12], dtype=torch.int32), 3, 8,
                                      block_table=block_table[:1])

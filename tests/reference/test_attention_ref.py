"""The attention reference against a float64 attention written query by query, independently."""
import math

import pytest
import torch

from pagoda.reference.attention import flash_attn_func, flash_attn_varlen_func


def naive(q, k, v, scale, left=-1, right=-1, softcap=0.0, slopes=None):
    """One query at a time in float64: q [sq, hq, d], k/v [sk, hk, d] -> out, lse [hq, sq]."""
    sq, hq, d = q.shape
    sk, hk, _ = k.shape
    out = torch.zeros(sq, hq, d, dtype=torch.float64)
    lse = torch.full((hq, sq), -math.inf, dtype=torch.float64)
    for h in range(hq):
        kh = k[:, h // (hq // hk)].double()
        vh = v[:, h // (hq // hk)].double()
        for i in range(sq):
            pos = i + sk - sq
            keys = [j for j in range(sk) if (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right)]
            if not keys:
                continue
            s = (kh[keys] @ q[i, h].double()) * scale
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            if slopes is not None:
                s = s - slopes[h].double() * torch.tensor([abs(pos - j) for j in keys], dtype=torch.float64)
            lse[h, i] = torch.logsumexp(s, 0)
            out[i, h] = torch.softmax(s, 0) @ vh[keys]
    return out, lse


@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 7), (5, 12), (12, 5)])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 2)), (True, (4, -1))])
def test_dense_against_naive(sq, sk, causal, window):
    q, k, v = torch.randn(2, sq, 4, 16), torch.randn(2, sk, 2, 16), torch.randn(2, sk, 2, 16)
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True,
                                  compute_dtype=torch.float64)
    for b in range(2):
        ref, ref_lse = naive(q[b], k[b], v[b], 16 ** -0.5, window[0], 0 if causal else window[1])
        torch.testing.assert_close(out[b].double(), ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(torch.isneginf(lse[b]), torch.isneginf(ref_lse))
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[b][fin].double(), ref_lse[fin], atol=1e-5, rtol=1e-5)


def test_softcap_alibi_scale_against_naive():
    q, k, v = torch.randn(1, 9, 2, 8) * 4, torch.randn(1, 11, 2, 8) * 4, torch.randn(1, 11, 2, 8)
    slopes = torch.tensor([0.5, 0.125])
    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, softcap=7.0, alibi_slopes=slopes,
                                  return_attn_probs=True, compute_dtype=torch.float64)
    ref, ref_lse = naive(q[0], k[0], v[0], 0.3, -1, 0, 7.0, slopes)
    torch.testing.assert_close(out[0].double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0].double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_varlen_equals_dense_per_sequence():
    lens = [(3, 5), (0, 4), (1, 1), (6, 0)]
    cu_q = torch.tensor([0] + list(torch.tensor([a for a, _ in lens]).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor([b for _, b in lens]).cumsum(0)), dtype=torch.int32)
    q, k, v = torch.randn(int(cu_q[-1]), 4, 8), torch.randn(int(cu_k[-1]), 4, 8), torch.randn(int(cu_k[-1]), 4, 8)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 5, causal=True, return_attn_probs=True,
                                         compute_dtype=torch.float64)
    for b in range(len(lens)):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        ref, ref_lse = naive(q[qs], k[ks], v[ks], 8 ** -0.5, -1, 0)
        torch.testing.assert_close(out[qs].double(), ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(torch.isneginf(lse[:, qs]), torch.isneginf(ref_lse))
    # The last sequence has no keys at all: zeros and -inf.
    assert torch.equal(out[int(cu_q[3]):], torch.zeros_like(out[int(cu_q[3]):]))
    assert torch.isneginf(lse[:, int(cu_q[3]):]).all()

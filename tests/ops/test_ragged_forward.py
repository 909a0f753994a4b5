"""`BatchPrefillWithRaggedKVCacheWrapper.forward` / `forward_return_lse`, FlashInfer's deprecated forms: the options
given per call replace the planned ones for that call only (float64 oracle: causal alignment to the end of the keys,
soft cap, sm_scale, FlashInfer's signed ALiBi, Llama RoPE on q and k), base-2 LSE."""
import inspect
import math

import pytest
import torch

import pagoda
from pagoda.reference.decode import alibi_slopes

HQ, HK, D = 4, 2, 32
QO, KV = [3, 5], [4, 9]


def _oracle(q, k, v, causal=False, sm_scale=None, soft_cap=0.0, alibi=False, rope=False):
    """float64 per request: ``(out [nnz, Hq, D], lse2 [nnz, Hq])``."""
    outs, lses = [], []
    qs = ks = 0
    for n, m in zip(QO, KV, strict=True):
        qq, kk, vv = q[qs:qs + n].double(), k[ks:ks + m].double(), v[ks:ks + m].double()
        qpos, kpos = torch.arange(m - n, m), torch.arange(m)
        if rope:
            inv = 1e4 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)

            def rot(x, pos, inv=inv):
                a = pos.double()[:, None] * inv[None]
                c, s = a.cos()[:, None], a.sin()[:, None]
                x1, x2 = x[..., :D // 2], x[..., D // 2:]
                return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
            qq, kk = rot(qq, qpos), rot(kk, kpos)
        kk = kk.repeat_interleave(HQ // HK, 1)
        vv = vv.repeat_interleave(HQ // HK, 1)
        s = torch.einsum("nhd,mhd->hnm", qq, kk) * (sm_scale or D ** -0.5)
        if soft_cap:
            s = soft_cap * torch.tanh(s / soft_cap)
        if alibi:
            s = s + alibi_slopes(HQ).double()[:, None, None] * (kpos[None, :] - qpos[:, None]).double()[None]
        if causal:
            s = s.masked_fill(~(kpos[None, :] <= qpos[:, None])[None], -math.inf)
        outs.append(torch.einsum("hnm,mhd->nhd", s.softmax(-1), vv))
        lses.append((torch.logsumexp(s, -1) / math.log(2.0)).t())
        qs, ks = qs + n, ks + m
    return torch.cat(outs), torch.cat(lses)


def _wrapper():
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))
    w.plan(torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 4, 13], dtype=torch.int32), HQ, HK, D,
           q_data_type=torch.float32)
    return w


def test_signature_matches_flashinfer():
    params = list(inspect.signature(pagoda.BatchPrefillWithRaggedKVCacheWrapper.forward_return_lse).parameters)
    assert params == ["self", "q", "k", "v", "causal", "pos_encoding_mode", "use_fp16_qk_reduction", "window_left",
                      "logits_soft_cap", "sm_scale", "rope_scale", "rope_theta"]
    fwd = list(inspect.signature(pagoda.BatchPrefillWithRaggedKVCacheWrapper.forward).parameters)
    assert fwd[:len(params)] == params


@pytest.mark.parametrize("opts", [dict(causal=True), dict(sm_scale=0.2, logits_soft_cap=5.0),
                                  dict(pos_encoding_mode="ALIBI"), dict(causal=True, pos_encoding_mode="ROPE_LLAMA")])
def test_forward_options_replace_the_plan_for_one_call(opts):
    q, k, v = torch.randn(8, HQ, D), torch.randn(13, HK, D), torch.randn(13, HK, D)
    w = _wrapper()
    want_o, want_l = _oracle(q, k, v, causal=opts.get("causal", False), sm_scale=opts.get("sm_scale"),
                             soft_cap=opts.get("logits_soft_cap", 0.0),
                             alibi=opts.get("pos_encoding_mode") == "ALIBI",
                             rope=opts.get("pos_encoding_mode") == "ROPE_LLAMA")
    out, lse = w.forward_return_lse(q, k, v, **opts)
    torch.testing.assert_close(out.double(), want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.forward(q, k, v, **opts), out)
    # The plan's options are back for run().
    torch.testing.assert_close(w.run(q, k, v).double(), _oracle(q, k, v)[0], atol=1e-5, rtol=1e-5)


def test_forward_before_plan_raises():
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="plan"):
        w.forward(torch.randn(1, HQ, D), torch.randn(1, HK, D), torch.randn(1, HK, D))

"""flash_attn_with_kvcache: append + rotate + attend, against pagoda.flash_attn_func on the same data laid out
contiguously (rotation by pagoda.ops.rope), contiguous and paged caches (any page size), validation, GPU."""
import pytest
import torch

import pagoda
from pagoda.ops import rope
from pagoda.ops.kvcache import flash_attn_with_kvcache
from tests.helpers import assert_finite_lse_close, rel_err


def _tables(n, rd, theta=1e4, device="cpu"):
    inv = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def _case(b=3, sq=1, s_new=1, hq=8, hk=2, d=64, s_cache=80, page_size=None, seqlens=(0, 17, 60), dtype=torch.float32,
          device="cpu", batch_idx=False):
    """Random cache + new tokens; returns kwargs for the op and each sequence's expected contiguous k/v."""
    seqlens = torch.tensor(seqlens[:b], dtype=torch.int32)
    hist_k = [torch.randn(int(n), hk, d, dtype=dtype) for n in seqlens]
    hist_v = [torch.randn(int(n), hk, d, dtype=dtype) for n in seqlens]
    q = torch.randn(b, sq, hq, d, dtype=dtype)
    k_new = torch.randn(b, s_new, hk, d, dtype=dtype) if s_new else None
    v_new = torch.randn(b, s_new, hk, d, dtype=dtype) if s_new else None
    kw = {}
    if page_size is None:
        rows = torch.randperm(b + 2)[:b].to(torch.int32) if batch_idx else torch.arange(b, dtype=torch.int32)
        k_cache = torch.randn(b + 2 if batch_idx else b, s_cache, hk, d, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        for i, r in enumerate(rows.tolist()):
            k_cache[r, :seqlens[i]], v_cache[r, :seqlens[i]] = hist_k[i], hist_v[i]
        if batch_idx:
            kw["cache_batch_idx"] = rows.to(device)
    else:
        width = -(-s_cache // page_size)
        pool = torch.randperm(b * width + 3)[:b * width].to(torch.int32).view(b, width)
        k_cache = torch.randn(b * width + 3, page_size, hk, d, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        for i in range(b):
            for t in range(int(seqlens[i])):
                k_cache[pool[i, t // page_size], t % page_size] = hist_k[i][t]
                v_cache[pool[i, t // page_size], t % page_size] = hist_v[i][t]
        kw["block_table"] = pool.to(device)

    def to(t):
        return None if t is None else t.to(device)

    kw.update(q=to(q), k_cache=to(k_cache), v_cache=to(v_cache), k=to(k_new), v=to(v_new),
              cache_seqlens=seqlens.to(device))
    return kw, hist_k, hist_v


def _oracle(kw, hist_k, hist_v, causal=False, window=(-1, -1), rotary=None, interleaved=True, **attn):
    q, k_new, v_new = kw["q"].cpu(), kw["k"], kw["v"]
    outs, lses = [], []
    for i in range(q.shape[0]):
        n = hist_k[i].shape[0]
        kk, vv, qq = hist_k[i], hist_v[i], q[i]
        if k_new is not None:
            kn, vn = k_new[i].cpu(), v_new[i].cpu()
            if rotary is not None:
                s_new = kn.shape[0]
                pos = torch.arange(n, n + s_new)
                _, kn = rope.apply_rope_pos_ids(kn, kn, pos, rotary_dim=rotary, interleave=interleaved)
                local = causal or window != (-1, -1)
                qpos = torch.arange(n, n + qq.shape[0]) if local else torch.full((qq.shape[0],), n)
                qq, _ = rope.apply_rope_pos_ids(qq, qq, qpos, rotary_dim=rotary, interleave=interleaved)
            kk, vv = torch.cat([kk, kn]), torch.cat([vv, vn])
        a = dict(attn)
        if a.get("alibi_slopes") is not None and a["alibi_slopes"].dim() == 2:
            a["alibi_slopes"] = a["alibi_slopes"][i]
        o, l, _ = pagoda.flash_attn_func(qq[None], kk[None], vv[None], causal=causal, window_size=window,
                                         return_attn_probs=True, **a)
        outs.append(o[0])
        lses.append(l[0])
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("page_size", [None, 1, 7, 16])
@pytest.mark.parametrize("sq,s_new,causal", [(1, 1, False), (1, 0, False), (5, 5, True), (3, 2, False)])
def test_cpu_matches_contiguous_attention(page_size, sq, s_new, causal):
    kw, hk_, hv_ = _case(sq=sq, s_new=s_new, page_size=page_size)
    out, lse = flash_attn_with_kvcache(**kw, causal=causal, return_softmax_lse=True)
    want, want_lse = _oracle(kw, hk_, hv_, causal=causal)
    assert out.shape == kw["q"].shape and lse.shape == (3, 8, sq)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse, atol=1e-4)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (False, (6, 2))])
@pytest.mark.parametrize("page_size", [None, 5])
def test_cpu_rotary_append_and_attend(interleaved, causal, window, page_size):
    kw, hk_, hv_ = _case(sq=4, s_new=4, page_size=page_size, batch_idx=page_size is None)
    cos, sin = _tables(100, 32)
    k_cache_before = kw["k_cache"].clone()
    out = flash_attn_with_kvcache(**kw, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved,
                                  causal=causal, window_size=window)
    want, _ = _oracle(kw, hk_, hv_, causal=causal, window=window, rotary=32, interleaved=interleaved)
    assert rel_err(out, want) < 1e-5
    assert not torch.equal(kw["k_cache"], k_cache_before), "k was not appended in place"


def test_cpu_int_seqlens_softcap_alibi_gqa():
    kw, hk_, hv_ = _case(b=2, sq=1, s_new=0, hq=16, hk=2, seqlens=(40, 40))
    kw["cache_seqlens"] = 40
    slopes = torch.rand(2, 16)
    out = flash_attn_with_kvcache(**kw, softcap=3.0, alibi_slopes=slopes, softmax_scale=0.2)
    want, _ = _oracle(kw, hk_, hv_, softcap=3.0, alibi_slopes=slopes, softmax_scale=0.2)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("change,err,match", [
    (dict(cache_seqlens=torch.tensor([0, 17, 80], dtype=torch.int32)), ValueError, "capacity"),
    (dict(cache_seqlens=torch.tensor([0, 17, 60], dtype=torch.int64)), TypeError, "cache_seqlens"),
    (dict(cache_seqlens=None), ValueError, "cache_seqlens"),
    (dict(v=None), ValueError, "k and v"),
    (dict(k=torch.randn(3, 1, 4, 64)), ValueError, "k must be"),
    (dict(cache_batch_idx=torch.tensor([0, 1, 9], dtype=torch.int32)), ValueError, "cache_batch_idx"),
    (dict(rotary_cos=torch.randn(100, 16)), ValueError, "rotary_cos and rotary_sin"),
    (dict(rotary_cos=torch.randn(100, 40), rotary_sin=torch.randn(100, 40)), ValueError, "rotary_cos"),
    (dict(rotary_cos=torch.randn(10, 16), rotary_sin=torch.randn(10, 16)), ValueError, "rotary tables"),
    (dict(window_size=(2,)), ValueError, "window_size"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(q=torch.randn(3, 1, 5, 64)), ValueError, "num_qo_heads"),
])
def test_validation(change, err, match):
    kw, _, _ = _case()
    kw.update(change)
    with pytest.raises(err, match=match):
        flash_attn_with_kvcache(**kw)


def test_paged_validation():
    kw, _, _ = _case(page_size=16)
    bad = kw["block_table"].clone()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(**{**kw, "block_table": bad})
    with pytest.raises(ValueError, match="cache_batch_idx"):
        flash_attn_with_kvcache(**kw, cache_batch_idx=torch.arange(3, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 1, 16, 256])
@pytest.mark.parametrize("sq,s_new,causal", [(1, 1, True), (1, 0, False), (16, 16, True), (7, 3, False)])
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (8, 8, 64), (16, 2, 256)])
@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_cuda_matches_contiguous_attention(page_size, sq, s_new, causal, hq, hk, d, num_splits):
    kw, hk_, hv_ = _case(b=4, sq=sq, s_new=s_new, hq=hq, hk=hk, d=d, s_cache=3000, page_size=page_size,
                         seqlens=(0, 1, 2000, 2900), dtype=torch.bfloat16, device="cuda")
    out, lse = flash_attn_with_kvcache(**kw, causal=causal, num_splits=num_splits, return_softmax_lse=True)
    kw_cpu = {k_: (t.cpu() if isinstance(t, torch.Tensor) else t) for k_, t in kw.items()}
    want, want_lse = _oracle(kw_cpu, hk_, hv_, causal=causal)
    assert rel_err(out.cpu(), want) < 1e-2
    assert_finite_lse_close(lse.cpu(), want_lse, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("page_size", [None, 16])
def test_cuda_rotary(interleaved, page_size):
    kw, hk_, hv_ = _case(sq=4, s_new=4, page_size=page_size, dtype=torch.float16, device="cuda")
    cos, sin = _tables(100, 64, device="cuda")
    out = flash_attn_with_kvcache(**kw, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, causal=True)
    kw_cpu = {k_: (t.cpu() if isinstance(t, torch.Tensor) else t) for k_, t in kw.items()}
    want, _ = _oracle(kw_cpu, hk_, hv_, causal=True, rotary=64, interleaved=interleaved)
    assert rel_err(out.cpu(), want) < 2e-3

"""flash_attn_with_kvcache(cache_leftpad=): keys before each sequence's start are not attended, new k/v and
rotary positions stay absolute cache positions, masks and ALiBi count from the start (flash-attn 2.8.3's
contract). Oracle: a float64 attention over the whole padded cache written from that contract (key padding
mask, shifted key columns, rotary at ``cache_seqlens + i``); both the reference and the Triton path."""
import pytest
import torch

from pagoda.ops.kvcache import flash_attn_with_kvcache


def _tables(n, rd):
    inv = 1.0 / 1e4 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def _rotate64(x, pos, cos, sin, interleaved):
    """x ``[b, s, h, d]`` rotated at integer positions ``pos [b, s]`` (float64, first 2 * cos.shape[1] dims)."""
    half = cos.shape[1]
    c, s = cos.double()[pos][:, :, None], sin.double()[pos][:, :, None]
    x = x.double().clone()
    idx1, idx2 = (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else (slice(0, half),
                                                                                     slice(half, 2 * half))
    x1, x2 = x[..., idx1].clone(), x[..., idx2].clone()
    x[..., idx1], x[..., idx2] = x1 * c - x2 * s, x2 * c + x1 * s
    return x


def _oracle(q, k_cache, v_cache, k, v, seqlens, leftpad, rows, causal=False, window=(-1, -1), rotary=None,
            interleaved=True, alibi=None, softcap=0.0):
    """float64 ``(out [b, sq, hq, d], lse [b, hq, sq], k_cache_after, v_cache_after)`` over the full cache rows,
    masking keys outside ``[leftpad, seqlens + s_new)``; the inputs are not modified."""
    b, sq, hq, d = q.shape
    kc, vc = k_cache[rows].double().clone(), v_cache[rows].double().clone()     # [b, s_cache, hk, d]
    s_cache, hk = kc.shape[1], kc.shape[2]
    s_new = 0 if k is None else k.shape[1]
    ar = torch.arange(s_cache)
    qd = q.double()
    if k is not None:
        kpos = seqlens.long()[:, None] + torch.arange(s_new)[None, :]
        kn = _rotate64(k, kpos, *rotary, interleaved) if rotary else k.double()
        for i in range(b):
            kc[i, kpos[i]], vc[i, kpos[i]] = kn[i], v[i].double()
    if rotary:
        local = causal or window != (-1, -1)
        qpos = seqlens.long()[:, None] + (torch.arange(sq)[None, :] if local else torch.zeros(1, sq, dtype=torch.long))
        qd = _rotate64(q, qpos, *rotary, interleaved)
    valid = (ar[None] < (seqlens.long() + s_new)[:, None]) & (ar[None] >= leftpad.long()[:, None])   # [b, s_cache]
    col = ar[None] - leftpad.long()[:, None]                       # key index counted from the start
    sk = valid.sum(1)                                              # attended keys per sequence
    diag = torch.arange(sq)[None, :, None] + (sk - sq)[:, None, None]          # [b, sq, 1]: the query's key index
    keep = valid[:, None, :].expand(b, sq, s_cache).clone()                    # [b, sq, s_cache]
    left, right = window[0], (0 if causal else window[1])
    if right >= 0:
        keep &= col[:, None, :] <= diag + right
    if left >= 0:
        keep &= col[:, None, :] >= diag - left
    kr, vr = kc.repeat_interleave(hq // hk, 2), vc.repeat_interleave(hq // hk, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kr) * d ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        s = s - alibi.double()[:, :, None, None] * (diag[:, None] - col[:, None, None, :]).abs()
    s = s.masked_fill(~keep[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(keep[:, None], torch.exp(s - lse[..., None].clamp_min(-1e30)), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vr)
    return out, lse, kc, vc


def _case(b=3, sq=1, s_new=1, hq=4, hk=2, d=32, s_cache=24, seqlens=(9, 14, 0), leftpad=(3, 14, 0),
          dtype=torch.float32, spare_rows=0):
    q = torch.randn(b, sq, hq, d, dtype=dtype)
    k_cache = torch.randn(b + spare_rows, s_cache, hk, d, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k = torch.randn(b, s_new, hk, d, dtype=dtype) if s_new else None
    v = torch.randn(b, s_new, hk, d, dtype=dtype) if s_new else None
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                cache_seqlens=torch.tensor(seqlens[:b], dtype=torch.int32),
                cache_leftpad=torch.tensor(leftpad[:b], dtype=torch.int32))


def _check(kw, out, lse, want, tol):
    want_out, want_lse, want_k, want_v = want
    assert (out.double() - want_out).abs().max() < tol
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double()[finite] - want_lse[finite]).abs().max() < tol
    rows = kw.get("cache_batch_idx")
    rows = torch.arange(kw["q"].shape[0]) if rows is None else rows.long()
    assert (kw["k_cache"][rows].double() - want_k).abs().max() < tol, "append (rotated k) differs"
    assert torch.equal(kw["v_cache"][rows].double(), want_v), "append of v differs"


def _run(kw, **opts):
    rows = kw.get("cache_batch_idx")
    rows = torch.arange(kw["q"].shape[0]) if rows is None else rows.long()
    rot = (opts["rotary_cos"], opts["rotary_sin"]) if "rotary_cos" in opts else None
    want = _oracle(kw["q"], kw["k_cache"], kw["v_cache"], kw["k"], kw["v"], kw["cache_seqlens"], kw["cache_leftpad"],
                   rows, causal=opts.get("causal", False), window=tuple(opts.get("window_size", (-1, -1))),
                   rotary=rot, interleaved=opts.get("rotary_interleaved", True), alibi=opts.get("alibi_slopes"),
                   softcap=opts.get("softcap", 0.0))
    out, lse = flash_attn_with_kvcache(**kw, **opts, return_softmax_lse=True)
    return out, lse, want


@pytest.mark.parametrize("sq,s_new", [(1, 1), (1, 0), (4, 4), (3, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_leftpad_masks_and_appends(path, sq, s_new, causal):
    # Sequence 1 starts at its end (no cached key) and sequence 2 has an empty cache.
    kw = _case(sq=sq, s_new=s_new)
    out, lse, want = _run(kw, causal=causal)
    _check(kw, out, lse, want, 1e-4)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_leftpad_rotary_at_absolute_positions(path, interleaved, causal):
    kw = _case(sq=3, s_new=3, seqlens=(9, 14, 2), leftpad=(4, 6, 1))
    cos, sin = _tables(24, 8)            # rotary_dim 16 of head_dim 32
    out, lse, want = _run(kw, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, causal=causal)
    _check(kw, out, lse, want, 1e-4)


def test_leftpad_window_alibi_softcap_batch_idx(path):
    kw = _case(sq=2, s_new=1, hq=6, hk=2, seqlens=(12, 20, 5), leftpad=(5, 1, 5), spare_rows=2)
    kw["cache_batch_idx"] = torch.tensor([4, 0, 2], dtype=torch.int32)
    slopes = torch.rand(3, 6) * 0.5
    out, lse, want = _run(kw, window_size=(4, 1), alibi_slopes=slopes, softcap=2.0)
    _check(kw, out, lse, want, 1e-4)


@pytest.mark.parametrize("same_row_stride", [True, False])
def test_leftpad_strided_cache_fp16(triton_on_cpu, same_row_stride):
    # Cache rows wider than seqlen_cache (a slice of a larger buffer); with different k and v row strides
    # the kernel path reads a contiguous copy.
    kw = _case(sq=1, s_new=1, dtype=torch.float16, seqlens=(9, 14, 20), leftpad=(3, 0, 19))
    for name, extra in (("k_cache", 8), ("v_cache", 8 if same_row_stride else 5)):
        buf = torch.randn(3, 24 + extra, 2, 32, dtype=torch.float16)
        buf[:, :24] = kw[name]
        kw[name] = buf[:, :24]
    out, lse, want = _run(kw, causal=True)
    _check(kw, out, lse, want, 2e-3)
    assert kw["k_cache"]._base is not None, "the append must land in the caller's (strided) cache"


def test_leftpad_int_seqlens_and_zero_pad_match_no_pad(path):
    kw = _case(sq=1, s_new=0, seqlens=(14, 14, 14), leftpad=(0, 0, 0))
    kw["cache_seqlens"] = 14
    base = flash_attn_with_kvcache(**{**kw, "cache_leftpad": None})
    assert torch.equal(flash_attn_with_kvcache(**kw), base)
    kw["cache_leftpad"] = torch.tensor([2, 0, 13], dtype=torch.int32)
    out = flash_attn_with_kvcache(**kw)
    want = _oracle(kw["q"], kw["k_cache"], kw["v_cache"], None, None, torch.full((3,), 14, dtype=torch.int32),
                   kw["cache_leftpad"], torch.arange(3))[0]
    assert (out.double() - want).abs().max() < 1e-4
    assert torch.equal(out[1], base[1]) and not torch.allclose(out[0], base[0])


@pytest.mark.parametrize("leftpad,err,match", [
    (torch.zeros(3, dtype=torch.int64), TypeError, "cache_leftpad"),
    (torch.zeros(3), TypeError, "cache_leftpad"),
    (torch.zeros(2, dtype=torch.int32), ValueError, "cache_leftpad"),
    (torch.zeros(3, 1, dtype=torch.int32), ValueError, "cache_leftpad"),
    (torch.tensor([0, -1, 0], dtype=torch.int32), ValueError, "cache_leftpad"),
    (torch.tensor([10, 0, 0], dtype=torch.int32), ValueError, "cache_leftpad"),   # past cache_seqlens[0] = 9
    ([0, 0, 0], TypeError, "cache_leftpad"),
])
def test_leftpad_validation(leftpad, err, match):
    kw = _case()
    kw["cache_leftpad"] = leftpad
    with pytest.raises(err, match=match):
        flash_attn_with_kvcache(**kw)


def test_leftpad_with_block_table_is_refused():
    # flash-attn 2.8.3 does not run paged KV and leftpad together; pagoda refuses the pair as well.
    kw = _case()
    kw["block_table"] = torch.arange(3, dtype=torch.int32)[:, None]
    with pytest.raises(ValueError, match="cache_leftpad.*block_table"):
        flash_attn_with_kvcache(**kw)


@pytest.mark.gpu
@pytest.mark.parametrize("sq,s_new,causal", [(1, 1, True), (1, 0, False), (64, 64, True), (7, 3, False)])
@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_cuda_leftpad(sq, s_new, causal, num_splits):
    kw = _case(b=2, sq=sq, s_new=s_new, hq=8, hk=2, d=128, s_cache=2048, seqlens=(1500, 300), leftpad=(700, 0),
               dtype=torch.bfloat16)
    cos, sin = _tables(2048, 64)
    opts = dict(causal=causal, num_splits=num_splits)
    if s_new:
        opts.update(rotary_cos=cos, rotary_sin=sin)
    want = _oracle(kw["q"], kw["k_cache"], kw["v_cache"], kw["k"], kw["v"], kw["cache_seqlens"], kw["cache_leftpad"],
                   torch.arange(2), causal=causal, rotary=(cos, sin) if s_new else None)
    gpu = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    opts_gpu = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in opts.items()}
    out = flash_attn_with_kvcache(**gpu, **opts_gpu)
    assert (out.cpu().double() - want[0]).abs().max() < 2e-2

"""The Gluon sm_90 attention kernel (`pagoda.kernels.hopper.attention`) against the float32 reference.

Runs only on an sm_90 GPU (H100/H200). Outputs and LSE are NaN-poisoned before the launch so every
element must be written; rows past seqlen_q of the TMA box must not leak into the next batch.
"""
import pytest
import torch

from pagoda.kernels.hopper import configs as _CONFIGS
from pagoda.reference.attention import flash_attn_func as ref_attn
from tests.helpers import assert_finite_lse_close, rel_err

pytestmark = pytest.mark.gpu


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


requires_sm90 = pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")

# (batch, seqlen_q, seqlen_k): equal lengths, odd lengths, q shorter and longer than k.
_SHAPES = [(1, 1, 1), (2, 17, 17), (3, 128, 128), (1, 1000, 1000), (1, 4096, 4096), (2, 17, 300),
           (2, 300, 17), (1, 1, 1000), (3, 1000, 4096), (1, 257, 129)]


def _run(b, sq, sk, hq, hk, d, causal, dtype, config=None):
    from pagoda.kernels.hopper import attention as H
    q = torch.randn(b, sq, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq, sq), float("nan"), device="cuda")
    assert H.hopper_supported(q, k, v, out, window_right=0 if causal else -1)
    H.attention_fwd_hopper(q, k, v, out, lse, d ** -0.5, causal, config=config)
    r, rl, _ = ref_attn(q, k, v, causal=causal, return_attn_probs=True)
    assert not out.isnan().any(), "unwritten output"
    assert not lse.isnan().any(), "unwritten lse"
    assert rel_err(out, r) < (1.2e-2 if dtype == torch.bfloat16 else 2e-3)
    assert_finite_lse_close(lse, rl, atol=2e-3)


@requires_sm90
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "b{}q{}k{}".format(*s))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hopper_matches_reference(shape, d, causal, dtype):
    b, sq, sk = shape
    _run(b, sq, sk, 4, 4, d, causal, dtype)


@requires_sm90
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_gqa(group, causal):
    _run(2, 1000, 1000, 8, 8 // group, 128, causal, torch.bfloat16)


@requires_sm90
@pytest.mark.parametrize("name", list(_CONFIGS.WS_CONFIGS))
@pytest.mark.parametrize("d", [64, 128])
def test_hopper_every_config(name, d):
    if d not in _CONFIGS.config_head_dims(name):  # ws3 / ws1x3 / pws1x3: head_dim 64 only (registers, smem per SM)
        with pytest.raises(ValueError):
            _run(1, 17, 17, 2, 2, d, True, torch.bfloat16, config=name)
        pytest.skip(f"{name} does not support head_dim {d}")
    _run(2, 777, 1000, 4, 2, d, True, torch.bfloat16, config=name)
    _run(1, 513, 513, 2, 2, d, False, torch.float16, config=name)
    # More work items than SMs: persistent programs run several items (ring state carried over).
    _run(3, 1000, 1000, 16, 4, d, True, torch.bfloat16, config=name)
    if name.startswith("ws3"):
        # 192-row tiles, bottom-right causal with sq > sk (rows without a visible key: zeros, LSE -inf), a
        # tile whose last warpgroup is past sq, and one key tile shorter than BLOCK_N.
        _run(2, 500, 300, 4, 1, d, True, torch.float16, config=name)
        _run(1, 200, 100, 2, 2, d, False, torch.bfloat16, config=name)
    if name.startswith("pws"):
        # Persistent warp-specialised: ~16 short items per program (the b32 s512 shape), and items of
        # different key-tile counts (1..3, odd counts: ring slots / phases / ping-pong turns carried across
        # items), rows without a visible key.
        _run(32, 512, 512, 8, 8, d, False, torch.bfloat16, config=name)
        _run(4, 500, 300, 48, 6, d, True, torch.float16, config=name)


@requires_sm90
@pytest.mark.parametrize("name, d", [("ws3-m192n128s2", 64), ("wspp-m128n128s2", 128),
                                     ("pws-m128n128s2", 128), ("pws3-m192n128s2", 64), ("pws1x3-m64n64s2", 64),
                                     ("pws1x2-m64n64s2", 128)])
@pytest.mark.parametrize("sq, sk", [(1000, 1000), (4096 + 64, 4096 + 64), (700, 1500)])
def test_causal_bottom_aligned_tiles_stay_in_bounds(name, d, sq, sk):
    """Causal tiles are aligned to the last query row; when sq is not a multiple of BLOCK_M the top tile is
    clamped to row 0 and overlaps the next one (both write the shared rows). O is a view inside a NaN-filled
    buffer: the rows around it stay NaN, and every row of O is written and matches the reference, LSE
    included."""
    from pagoda.kernels.hopper import attention as H
    b, hq, hk = 2, 4, 2
    q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
    buf = torch.full((b, sq + 2, hq, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = buf[:, 1:-1]
    lse_buf = torch.full((b, hq, sq + 2), float("nan"), device="cuda")
    lse = lse_buf[:, :, 1:-1]
    assert H.hopper_supported(q, k, v, out, window_right=0)
    H.attention_fwd_hopper(q, k, v, out, lse, d ** -0.5, True, config=name)
    assert buf[:, 0].isnan().all() and buf[:, -1].isnan().all(), "O written outside its rows"
    assert lse_buf[:, :, 0].isnan().all() and lse_buf[:, :, -1].isnan().all(), "LSE written outside its rows"
    r, rl, _ = ref_attn(q, k, v, causal=True, return_attn_probs=True)
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten rows"
    assert rel_err(out, r) < 1.2e-2
    assert_finite_lse_close(lse, rl, atol=2e-3)


@requires_sm90
def test_dispatch_through_flash_attn_func(monkeypatch):
    import pagoda
    from pagoda.kernels.hopper import attention as H
    monkeypatch.delenv("PAGODA_HOPPER_ATTN", raising=False)  # on by default on sm_90
    calls = []
    real = H.attention_fwd_hopper
    monkeypatch.setattr(H, "attention_fwd_hopper", lambda *a, **kw: (calls.append(1), real(*a, **kw)))
    q = torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out, lse, _ = pagoda.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert calls, "the Hopper kernel was not dispatched"
    monkeypatch.setenv("PAGODA_HOPPER_ATTN", "0")
    pagoda.flash_attn_func(q, k, v, causal=True)
    assert len(calls) == 1, "PAGODA_HOPPER_ATTN=0 must route to the Triton kernel"
    r, rl, _ = ref_attn(q, k, v, causal=True, return_attn_probs=True)
    assert rel_err(out, r) < 1.2e-2
    assert_finite_lse_close(lse, rl, atol=2e-3)
    # Options the Gluon kernel does not implement keep using the generic kernel.
    assert not H.hopper_supported(q, k, v, window_left=16, window_right=0)
    assert not H.hopper_supported(q, k, v, softcap=30.0)


@requires_sm90
@pytest.mark.parametrize("name", [None, "pws-m128n128s2", "wspp-m128n128s2", "ws1x3-m64n64s2", "ws3-m192n128s2"])
def test_gluon_fast_launch_matches_normal_launch(monkeypatch, name):
    """Repeats of a launch configuration go through `launch.tma` (descriptors encoded by pagoda, the C
    launcher called directly): with other shapes, other tensors, with and without LSE, they give the same bits
    as Triton's own launch (PAGODA_GLUON_FAST_LAUNCH=0) and match the reference."""
    from pagoda.kernels.hopper import attention as H
    from pagoda.kernels.launch import tma as _tma_launch
    d = 64 if name in (None, "ws1x3-m64n64s2", "ws3-m192n128s2") else 128
    for shape in ((2, 300, 300), (2, 300, 300), (1, 1000, 777), (3, 64, 200)):
        _run(*shape, 4, 2, d, True, torch.bfloat16, config=name)
    calls = []
    real = _tma_launch._FILL[0] if _tma_launch._FILL else None
    if _tma_launch.enabled():
        monkeypatch.setattr(_tma_launch, "_FILL", [lambda *a: (calls.append(1), real(*a))[1]])
    for b, sq, sk, causal, with_lse in ((2, 300, 300, True, True), (3, 129, 500, False, False),
                                        (1, 700, 700, True, False), (2, 64, 4000, False, True)):
        q = torch.randn(b, sq, 8, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, sk, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        outs = []
        for fast in ("1", "1", "0"):
            monkeypatch.setenv("PAGODA_GLUON_FAST_LAUNCH", fast)
            out = torch.full_like(q, float("nan"))
            lse = torch.full((b, 8, sq), float("nan"), device="cuda") if with_lse else None
            H.attention_fwd_hopper(q, k, v, out, lse, d ** -0.5, causal, config=name)
            outs.append((out, lse))
        for out, lse in outs[:2]:
            assert torch.equal(out, outs[2][0]), "the repeat launch differs from Triton's"
            if with_lse:
                assert torch.equal(lse, outs[2][1])
        r = ref_attn(q, k, v, causal=causal)
        assert rel_err(outs[0][0], r) < 1.2e-2
    if _tma_launch.enabled():
        assert calls, "no launch took the repeat path"

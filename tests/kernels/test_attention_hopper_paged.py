"""Paged Gluon prefill (`pagoda.kernels.hopper.paged`): the 2-D token-row view of paged caches and
the page-size policy on the CPU, an ahead-of-time sm_90 compile, and on an H100/H200 the kernel against the
reference and the Triton paged kernel (page sizes 16-256, NHD/HND, GQA, NaN in unused slots)."""
import math

import pytest
import torch

from pagoda.ops import _paged
from tests.helpers import assert_finite_lse_close, rel_err, run_aot_script
from tests.paged_utils import empty_cache, fill_cache, random_page_table

pytest.importorskip("triton")
from pagoda.kernels.hopper import paged as P  # noqa: E402


def test_box_rows_policy():
    assert [P.box_rows(p) for p in (16, 32, 64, 128, 256, 384)] == [16, 32, 64, 128, 128, 128]
    assert [P.box_rows(p) for p in (1, 7, 8, 48, 96, 200)] == [None] * 6


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("combined", [False, True])
def test_cache_rows_address_every_token(layout, combined):
    """Row ``page * rows_per_page + slot + kvh * rows_per_head``, column ``kvh * cols_per_head`` of the 2-D
    view is token (page, slot) of KV head kvh, for the tuple and the combined ``[pages, 2, ...]`` forms."""
    pages, ps, hk, d = 5, 16, 3, 64
    shape = (pages, ps, hk, d) if layout == "NHD" else (pages, hk, ps, d)
    full = torch.randn(pages, 2, *shape[1:]) if combined else torch.randn(*shape)
    cache = full[:, 1] if combined else full
    strides = _paged.cache_strides(cache, layout)
    rows, cols, rpp, rph, cph = P.cache_rows(cache, strides, ps, hk, d)
    view = torch.as_strided(cache, (rows, cols), (strides[1], 1))
    for page in range(pages):
        for slot in (0, 7, ps - 1):
            for h in range(hk):
                want = cache[page, slot, h] if layout == "NHD" else cache[page, h, slot]
                r, c = page * rpp + slot + h * rph, h * cph
                assert torch.equal(view[r, c:c + d], want)


def test_cache_rows_rejects_unaligned_rows():
    cache = torch.randn(4, 16, 3, 6)[..., :5]  # token stride 18 elements: not 16-byte aligned in fp32
    assert P.cache_rows(cache, (cache.stride(0), cache.stride(1), cache.stride(2)), 16, 3, 5) is None


def _scope_args(**over):
    q = torch.randn(256, 8, 128, dtype=torch.bfloat16)
    cache = torch.randn(32, 2, 16, 2, 128, dtype=torch.bfloat16)
    kc, vc = cache[:, 0], cache[:, 1]
    args = dict(q=q, k_cache=kc, v_cache=vc, k_strides=_paged.cache_strides(kc, "NHD"),
                v_strides=_paged.cache_strides(vc, "NHD"), page_size=16, num_kv_heads=2, window_left=-1,
                window_right=0, logits_soft_cap=0.0, alibi_slopes=None, rope=None, num_splits=0)
    args.update(over)
    return args


def test_paged_scope_reasons():
    """What keeps a call on the Triton kernel, each condition alone (in scope: None)."""
    assert P.paged_unsupported(**_scope_args()) is None
    assert P.paged_unsupported(**_scope_args(window_right=-1)) is None  # full attention
    q32 = torch.randn(256, 8, 128)
    cases = {
        "dtype": dict(q=q32),
        "cache dtype": dict(k_cache=torch.randn(32, 16, 2, 128, dtype=torch.float16)),
        "split": dict(num_splits=4),
        "window": dict(window_left=100),
        "soft-cap": dict(logits_soft_cap=30.0),
        "ALiBi": dict(alibi_slopes=torch.ones(8)),
        "RoPE": dict(rope=(1.0, 1e4)),
        "head_dim": dict(q=torch.randn(256, 8, 96, dtype=torch.bfloat16)),
        "page_size": dict(page_size=8),
        "q rows": dict(q=torch.randn(256, 8, 256, dtype=torch.bfloat16)[..., :128]),
    }
    for what, over in cases.items():
        reason = P.paged_unsupported(**_scope_args(**over))
        assert reason is not None, what
    assert "page_size 8" in P.paged_unsupported(**_scope_args(page_size=8))
    assert not P.paged_supported(**_scope_args())  # in scope, but a CPU tensor


_AOT = r'''
import re, sys
import triton
from pagoda.kernels.hopper.gluon import GLUON_OK
if not GLUON_OK:
    print("NO_GLUON"); sys.exit(0)
from pagoda.kernels.hopper.aot import compile_paged_sm90
from triton.tools.disasm import get_sass
for d, dt, causal, box, pp, o_tma, lse, cm in [(128, "bf16", True, 16, False, True, True, False),
                                               (64, "fp16", False, 32, False, False, True, False),
                                               (128, "bf16", False, 128, True, True, False, False),
                                               (64, "bf16", True, 64, False, True, True, False),
                                               (128, "bf16", False, 16, False, True, True, True),
                                               (64, "fp16", False, 64, False, True, True, True)]:
    k = compile_paged_sm90(d, dt, causal, box, pp, o_tma, lse, custom_mask=cm)
    ptx, sass = k.asm["ptx"], get_sass(k.asm["cubin"])
    copies = len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared", ptx))
    stores = len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.global", ptx))
    msgs = (d * 2 + 127) // 128  # 128-byte swizzle: one TMA message per 64 bf16 columns
    print(f"d={d} {dt} causal={causal} box={box} mask={cm} smem={k.metadata.shared} copies={copies} "
          f"stores={stores}")
    assert k.metadata.shared <= 227 * 1024
    # Q (2 boxes) + K and V: one box per page of a 128-key tile
    assert copies == msgs * (2 + 2 * (128 // box)), copies
    # O: a TMA store in each consumer warpgroup (whole 64-row tiles) only with o_tma
    assert (stores >= 2) if o_tma else (stores == 0), stores
    assert "USETMAXREG" in sass and "HGMMA" in sass and "UTMALDG" in sass
    spills = len(re.findall(r"\b(STL|LDL)\b", sass))
    print(f"  local-memory spill instructions: {spills} (triton {triton.__version__})")
    if NO_SPILLS:
        assert spills == 0, spills
print("COMPILED")
'''


def _compile(no_spills: bool):
    run_aot_script(f"NO_SPILLS = {no_spills}\n" + _AOT)


def test_paged_kernel_compiles_for_sm90():
    """Every variant lowers (any Triton with Gluon); TMA copies: Q boxes plus one box per page of a tile."""
    _compile(no_spills=False)


@pytest.mark.skipif(not __import__("triton").__version__.startswith("3.6"),
                    reason="register plan checked with Triton 3.6 (the GPU machine's); 3.9's ptxas spills ~30-60 "
                           "instructions' worth in this kernel")
def test_paged_kernel_does_not_spill_with_triton_3_6():
    _compile(no_spills=True)


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and \
        __import__("pagoda.kernels.hopper.gluon", fromlist=["GLUON_OK"]).GLUON_OK


def _indptr(lens):
    p = torch.zeros(len(lens) + 1, dtype=torch.int32)
    p[1:] = torch.cumsum(torch.tensor(lens), 0)
    return p.cuda()


def _case(kv, qo, ps, hq, hk, d, layout, dtype):
    indptr, indices, last, max_pages = random_page_table(kv, ps, device="cuda")
    cache = empty_cache(max_pages, ps, hk, d, layout, dtype, device="cuda")  # NaN in every unused slot
    keys = [torch.randn(n, hk, d, dtype=dtype, device="cuda") for n in kv]
    vals = [torch.randn(n, hk, d, dtype=dtype, device="cuda") for n in kv]
    fill_cache(cache, keys, vals, indptr.cpu(), indices.cpu(), ps, layout)
    q = torch.randn(sum(qo), hq, d, dtype=dtype, device="cuda")
    return q, cache, (indptr, indices, last), torch.cat(keys), torch.cat(vals)


def _varlen(q, k, v, qo, kv, causal):
    """The independent oracle: flash_attn_varlen_func (the Triton varlen kernel) on contiguous k/v."""
    import pagoda
    o, lse, _ = pagoda.flash_attn_varlen_func(q, k, v, _indptr(qo), _indptr(kv), max(qo), max(kv), causal=causal,
                                              return_attn_probs=True)
    return o, lse.t()


def _run(q, cache, meta, qo, ps, hk, layout, causal):
    from pagoda.ops._dispatch import prefill_paged
    kc, vc = cache[:, 0], cache[:, 1]
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[0], q.shape[1]), float("nan"), dtype=torch.float32, device="cuda")
    prefill_paged(q, kc, vc, _paged.cache_strides(kc, layout), _paged.cache_strides(vc, layout), _indptr(qo),
                  *meta, ps, hk, max(qo), out, lse, sm_scale=q.shape[-1] ** -0.5, causal=causal)
    return out, lse


CASES = [  # (kv lens, qo lens): empty, length-1, long, partial last pages, fewer keys than queries
    ([0, 1, 1000, 37, 513, 129, 300], [0, 1, 1000, 37, 1, 129, 400]),
    ([4096], [4096]),
    ([200, 0, 2000], [256, 130, 1500]),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("ps", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("hq,hk", [(8, 8), (32, 8), (32, 4)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_paged_prefill_matches_reference(monkeypatch, ps, layout, hq, hk, d, causal):
    import pagoda.kernels.hopper.paged as pp
    calls = []
    real = pp.prefill_paged_hopper
    monkeypatch.setattr(pp, "prefill_paged_hopper", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv("PAGODA_HOPPER_ATTN", raising=False)
    for kv, qo in CASES[:1] if (hq, layout) != (32, "NHD") else CASES:
        q, cache, meta, k, v = _case(kv, qo, ps, hq, hk, d, layout, torch.bfloat16)
        out, lse = _run(q, cache, meta, qo, ps, hk, layout, causal)
        want, want_lse = _varlen(q, k, v, qo, kv, causal)
        assert not out.isnan().any() and rel_err(out, want) < 1e-2
        assert_finite_lse_close(lse, want_lse, atol=2e-2)
    assert calls, "the Gluon paged kernel did not run"


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_paged_prefill_equals_triton_kernel(monkeypatch, dtype):
    """Same data through the Gluon kernel and (PAGODA_HOPPER_ATTN=0) the Triton paged kernel."""
    kv, qo = CASES[0]
    q, cache, meta, _, _ = _case(kv, qo, 16, 32, 8, 128, "NHD", dtype)
    monkeypatch.delenv("PAGODA_HOPPER_ATTN", raising=False)
    a, la = _run(q, cache, meta, qo, 16, 8, "NHD", True)
    monkeypatch.setenv("PAGODA_HOPPER_ATTN", "0")
    b, lb = _run(q, cache, meta, qo, 16, 8, "NHD", True)
    assert rel_err(a, b) < 1e-2
    assert_finite_lse_close(la, lb, atol=2e-2)
    assert torch.equal(la.isinf(), lb.isinf())


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_wrapper_runs_the_gluon_kernel(monkeypatch, layout):
    """BatchPrefillWithPagedKVCacheWrapper (planned BLOCK_M, no split) reaches the Gluon kernel."""
    import pagoda.kernels.hopper.paged as pp
    from pagoda.ops.prefill import BatchPrefillWithPagedKVCacheWrapper
    calls = []
    real = pp.prefill_paged_hopper
    monkeypatch.setattr(pp, "prefill_paged_hopper", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv("PAGODA_HOPPER_ATTN", raising=False)
    kv, qo = [300, 1, 2000, 129, 0], [256, 1, 1500, 129, 0]  # the wrapper needs kv_len >= qo_len
    q, cache, meta, k, v = _case(kv, qo, 16, 32, 8, 128, layout, torch.bfloat16)
    w = BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 24, dtype=torch.uint8, device="cuda"), layout)
    w.plan(_indptr(qo), *meta, 32, 8, 128, 16, causal=True, q_data_type=torch.bfloat16)
    out, lse = w.run(q, cache, return_lse=True)
    assert torch.equal(w.run(q, cache), out)  # without return_lse the kernel skips the LSE: same O
    want, want_lse = _varlen(q, k, v, qo, kv, True)
    assert calls, "the wrapper did not reach the Gluon kernel"
    assert rel_err(out, want) < 1e-2
    assert_finite_lse_close(lse, want_lse / math.log(2.0), atol=2e-2)   # the wrapper's LSE is base 2


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and Gluon")
def test_o_by_tma_and_lse_skip_change_no_value():
    """O by TMA boxes (whole 64-row tiles) equals O by masked stores bit for bit; rows of other requests
    and past nnz stay untouched; lse=None writes no LSE and the same O."""
    from pagoda.kernels.hopper.paged import prefill_paged_hopper
    kv, qo = CASES[0]
    q, cache, (indptr, indices, last), _, _ = _case(kv, qo, 16, 32, 8, 128, "NHD", torch.bfloat16)
    kc, vc = cache[:, 0], cache[:, 1]
    strides = (_paged.cache_strides(kc, "NHD"), _paged.cache_strides(vc, "NHD"))
    pad = torch.cat([q, torch.randn(70, 32, 128, dtype=q.dtype, device="cuda")])  # rows past nnz
    outs = []
    for o_tma, with_lse in ((False, True), (True, True), (True, False)):
        out = torch.full_like(pad, 7.0)
        lse = torch.full(pad.shape[:2], 7.0, device="cuda") if with_lse else None
        prefill_paged_hopper(pad, kc, vc, *strides, _indptr(qo), indptr, indices, last, 16, 8, max(qo), out, lse,
                             sm_scale=128 ** -0.5, causal=True, o_tma=o_tma)
        # _indptr(qo) covers sum(qo) rows: the 70 rows past it belong to no request
        assert torch.all(out[sum(qo):] == 7.0)
        if lse is not None:
            assert torch.all(lse[sum(qo):] == 7.0)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and Gluon")
def test_paged_fast_launch_matches_normal_launch(monkeypatch):
    """PAGODA_PAGED_FAST_LAUNCH=1: repeats go through `launch.tma` (descriptors encoded by pagoda, the C
    launcher called directly). Other page tables, caches, layouts and options give the same bits as Triton's
    own launch (PAGODA_GLUON_FAST_LAUNCH=0)."""
    from pagoda.kernels.launch import tma as _tma_launch
    monkeypatch.delenv("PAGODA_HOPPER_ATTN", raising=False)
    monkeypatch.setenv("PAGODA_PAGED_FAST_LAUNCH", "1")
    calls = []
    cases = [(CASES[0], 16, "NHD", True), (CASES[2], 16, "NHD", True), (CASES[0], 64, "HND", False),
             (CASES[2], 128, "NHD", False), (CASES[0], 16, "NHD", True)]
    for (kv, qo), ps, layout, causal in cases:
        q, cache, meta, k, v = _case(kv, qo, ps, 32, 8, 128, layout, torch.bfloat16)
        outs = []
        for fast in ("1", "1", "0"):
            monkeypatch.setenv("PAGODA_GLUON_FAST_LAUNCH", fast)
            if fast == "1" and _tma_launch._FILL and not calls:
                real = _tma_launch._FILL[0]
                monkeypatch.setattr(_tma_launch, "_FILL", [lambda *a, real=real: (calls.append(1), real(*a))[1]])
            outs.append(_run(q, cache, meta, qo, ps, 8, layout, causal))
        for out, lse in outs[:2]:
            assert torch.equal(out, outs[2][0]) and torch.equal(lse.isnan(), outs[2][1].isnan())
            assert torch.equal(lse.nan_to_num(), outs[2][1].nan_to_num()), "the repeat launch differs from Triton's"
        want, _ = _varlen(q, k, v, qo, kv, causal)
        assert rel_err(outs[0][0], want) < 1e-2
    if _tma_launch.enabled():
        assert calls, "no launch took the repeat path"

"""RoPE ops: the reference against independent formulations, the public API (CPU path, validation), GPU."""
import math

import pytest
import torch

import pagoda.ops.rope as rope
from pagoda.reference import rope as ref
from tests.helpers import rel_err


def _rotate_half_oracle(x, pos, rd, theta, scale):
    """Neox/Llama form written the HF way: x * cos + rotate_half(x) * sin, float64."""
    inv = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    ang = (pos.double()[:, None] / scale) * inv[None, :]
    emb = torch.cat([ang, ang], -1)[:, None, :]
    xr = x[..., :rd].double()
    half = rd // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([xr * emb.cos() + rot * emb.sin(), x[..., rd:].double()], -1)


def _complex_oracle(x, pos, rd, freqs):
    """GPT-J/interleaved form as complex multiplication by e^{i p f}, float64."""
    xr = x[..., :rd].double().reshape(*x.shape[:-1], rd // 2, 2)
    z = torch.view_as_complex(xr.contiguous())
    rot = torch.polar(torch.ones_like(freqs), pos.double()[:, None] * freqs[None, :])[:, None, :]
    out = torch.view_as_real(z * rot).reshape(*x.shape[:-1], rd)
    return torch.cat([out, x[..., rd:].double()], -1)


def _hf_llama31_freqs(rd, theta, factor, low, high, old):
    """The loop from the Llama 3.1 release notes (per-frequency scaling)."""
    freqs = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    lo_wl, hi_wl = old / low, old / high
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(f)
        elif wl > lo_wl:
            out.append(f / factor)
        else:
            s = (old / wl - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("rd", [64, 32])
def test_reference_non_interleaved_matches_rotate_half(rd):
    x = torch.randn(9, 3, 64, dtype=torch.float64)
    pos = torch.randint(0, 5000, (9,))
    freqs = ref.rope_frequencies(rd, 2.0, 1e4)
    got = ref.rope_ref(x, pos, freqs, False, torch.float64)
    torch.testing.assert_close(got, _rotate_half_oracle(x, pos, rd, 1e4, 2.0), atol=1e-10, rtol=0)


def test_reference_interleaved_matches_complex_product():
    x = torch.randn(7, 2, 48, dtype=torch.float64)
    pos = torch.randint(0, 3000, (7,))
    freqs = ref.rope_frequencies(32, 1.0, 5e5)
    got = ref.rope_ref(x, pos, freqs, True, torch.float64)
    torch.testing.assert_close(got, _complex_oracle(x, pos, 32, freqs), atol=1e-10, rtol=0)


@pytest.mark.parametrize("low,high", [(1.0, 4.0), (2.0, 8.0)])
def test_llama31_frequencies_match_release_formula(low, high):
    got = ref.rope_frequencies(128, 8.0, 5e5, True, low, high, 8192)
    torch.testing.assert_close(got, _hf_llama31_freqs(128, 5e5, 8.0, low, high, 8192), rtol=1e-12, atol=0)


@pytest.mark.parametrize("interleave", [False, True])
def test_scores_depend_only_on_relative_position(interleave):
    # The defining property of RoPE: <R(p) q, R(p') k> depends only on p - p'.
    q, k = torch.randn(1, 1, 64, dtype=torch.float64), torch.randn(1, 1, 64, dtype=torch.float64)
    dot = []
    for p in (0, 100, 1234):
        qr, kr = ref.apply_rope_pos_ids(q, k, torch.tensor([p + 7]), interleave=interleave,
                                        compute_dtype=torch.float64)
        _, kr0 = ref.apply_rope_pos_ids(q, k, torch.tensor([p]), interleave=interleave, compute_dtype=torch.float64)
        dot.append((qr * kr0).sum().item())
    assert max(dot) - min(dot) < 1e-9


# ------------------------------------------------------------------------------------------- public API

def _qk(nnz=11, hq=4, hk=2, d=64, dtype=torch.float32, device="cpu"):
    return (torch.randn(nnz, hq, d, dtype=dtype, device=device), torch.randn(nnz, hk, d, dtype=dtype, device=device))


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 32])
def test_ragged_and_pos_ids_forms_agree_and_inplace(interleave, rotary_dim):
    q, k = _qk()
    indptr = torch.tensor([0, 3, 3, 11], dtype=torch.int32)
    offsets = torch.tensor([5, 0, 100], dtype=torch.int32)
    pos = torch.tensor([5, 6, 7, 100, 101, 102, 103, 104, 105, 106, 107], dtype=torch.int32)
    a = rope.apply_rope(q, k, indptr, offsets, rotary_dim=rotary_dim, interleave=interleave)
    b = rope.apply_rope_pos_ids(q, k, pos, rotary_dim=rotary_dim, interleave=interleave)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    oracle = _rotate_half_oracle(q, pos, rotary_dim or 64, 1e4, 1.0) if not interleave else \
        _complex_oracle(q, pos, rotary_dim or 64, ref.rope_frequencies(rotary_dim or 64, 1.0, 1e4))
    assert rel_err(a[0], oracle) < 1e-6
    if rotary_dim:
        assert torch.equal(a[0][..., rotary_dim:], q[..., rotary_dim:])
    qi, ki = q.clone(), k.clone()
    assert rope.apply_rope_inplace(qi, ki, indptr, offsets, rotary_dim=rotary_dim, interleave=interleave) is None
    assert torch.equal(qi, a[0]) and torch.equal(ki, a[1])


def test_llama31_forms():
    q, k = _qk(d=128)
    pos = torch.randint(0, 20000, (11,))
    a = rope.apply_llama31_rope_pos_ids(q, k, pos)
    freqs = _hf_llama31_freqs(128, 5e5, 8.0, 1.0, 4.0, 8192)
    # float32 angles at positions up to 2e4 carry ~1e-4 rad of rounding, as in any fp32 RoPE kernel.
    assert rel_err(a[1], ref.rope_ref(k.double(), pos, freqs, False, torch.float64)) < 5e-4
    qi, ki = q.clone(), k.clone()
    rope.apply_llama31_rope_pos_ids_inplace(qi, ki, pos)
    assert torch.equal(qi, a[0]) and torch.equal(ki, a[1])
    indptr = torch.tensor([0, 11], dtype=torch.int32)
    r = rope.apply_llama31_rope(q, k, indptr, torch.tensor([50], dtype=torch.int32), rope_scale=4.0)
    r2 = rope.apply_llama31_rope_pos_ids(q, k, torch.arange(50, 61), rope_scale=4.0)
    assert torch.equal(r[0], r2[0])
    rope.apply_llama31_rope_inplace(q, k, indptr, torch.tensor([50], dtype=torch.int32), rope_scale=4.0)
    assert torch.equal(q, r[0]) and torch.equal(k, r[1])


@pytest.mark.parametrize("call,err,match", [
    (lambda q, k: rope.apply_rope_pos_ids(q, k, torch.arange(3)), ValueError, "pos_ids"),
    (lambda q, k: rope.apply_rope_pos_ids(q, k, torch.arange(11.0)), TypeError, "pos_ids"),
    (lambda q, k: rope.apply_rope_pos_ids(q, k, torch.arange(11), rotary_dim=33), ValueError, "rotary_dim"),
    (lambda q, k: rope.apply_rope_pos_ids(q, k, torch.arange(11), rotary_dim=128), ValueError, "rotary_dim"),
    (lambda q, k: rope.apply_rope_pos_ids(q, k, torch.arange(11), rope_theta=0), ValueError, "rope_theta"),
    (lambda q, k: rope.apply_rope_pos_ids(q, k, torch.arange(11), rope_scale=-1), ValueError, "rope_scale"),
    (lambda q, k: rope.apply_rope_pos_ids(q, k, torch.arange(11), interleave=1), TypeError, "interleave"),
    (lambda q, k: rope.apply_rope_pos_ids(q, k.half(), torch.arange(11)), TypeError, "q, k"),
    (lambda q, k: rope.apply_rope_pos_ids(q, k[:5], torch.arange(11)), ValueError, "nnz"),
    (lambda q, k: rope.apply_rope_pos_ids(q, k[..., :32], torch.arange(11)), ValueError, "head_dim"),
    (lambda q, k: rope.apply_rope_pos_ids(q.int(), k.int(), torch.arange(11)), TypeError, "q"),
    (lambda q, k: rope.apply_rope(q, k, torch.tensor([0, 5]), torch.tensor([0])), ValueError, "indptr"),
    (lambda q, k: rope.apply_rope(q, k, torch.tensor([0, 11]), torch.tensor([0, 1])), ValueError, "indptr"),
    (lambda q, k: rope.apply_llama31_rope_pos_ids(q, k, torch.arange(11), low_freq_factor=5), ValueError,
     "high_freq_factor"),
    (lambda q, k: rope.apply_rope_pos_ids_inplace(q[..., ::2], k[..., ::2], torch.arange(11)), ValueError,
     "contiguous"),
])
def test_validation_names_the_argument(call, err, match):
    q, k = _qk()
    with pytest.raises(err, match=match):
        call(q, k)


# ------------------------------------------------------------------------------------------- GPU kernel

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("d,rotary_dim", [(64, None), (128, None), (128, 64), (256, 96), (80, 80)])
@pytest.mark.parametrize("llama31", [False, True])
def test_cuda_matches_reference(dtype, interleave, d, rotary_dim, llama31):
    q, k = _qk(nnz=300, hq=32, hk=8, d=d, dtype=dtype, device="cuda")
    pos = torch.randint(0, 8192, (300,), device="cuda", dtype=torch.int32)
    fn = rope.apply_llama31_rope_pos_ids if llama31 else rope.apply_rope_pos_ids
    rfn = ref.apply_llama31_rope_pos_ids if llama31 else ref.apply_rope_pos_ids
    got = fn(q, k, pos, rotary_dim=rotary_dim, interleave=interleave)
    want = rfn(q.cpu(), k.cpu(), pos.cpu(), rotary_dim=rotary_dim, interleave=interleave,
               compute_dtype=torch.float64)
    tol = 2e-4 if dtype == torch.float32 else 1e-2  # fp32 angles at positions < 8192
    for g, w in zip(got, want):
        assert rel_err(g.cpu(), w) < tol
    qi, ki = q.clone(), k.clone()
    (rope.apply_llama31_rope_pos_ids_inplace if llama31 else rope.apply_rope_pos_ids_inplace)(
        qi, ki, pos, rotary_dim=rotary_dim, interleave=interleave)
    assert torch.equal(qi, got[0]) and torch.equal(ki, got[1])


@pytest.mark.gpu
def test_cuda_ragged_graph_capture():
    q, k = _qk(nnz=40, dtype=torch.float16, device="cuda")
    indptr = torch.tensor([0, 10, 10, 40], dtype=torch.int32, device="cuda")
    offsets = torch.tensor([3, 0, 77], dtype=torch.int32, device="cuda")
    want = rope.apply_rope(q, k, indptr, offsets)
    qi, ki = q.clone(), k.clone()
    graph = torch.cuda.CUDAGraph()
    rope.apply_rope_inplace(qi.clone(), ki.clone(), indptr, offsets)  # warm-up (compiles)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        rope.apply_rope_inplace(qi, ki, indptr, offsets)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(qi, want[0]) and torch.equal(ki, want[1])

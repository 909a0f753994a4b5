"""merge_state / merge_state_in_place / merge_states: exact merging of attention over split KV.

The public merges take and return base-2 LSEs (FlashInfer's convention); the reference and the kernel merge
take either base.
"""
import math
import os

import pytest
import torch

import pagoda.ops.cascade as cascade
from pagoda.reference import cascade as ref
from pagoda.reference.attention import attention_ref
from tests.helpers import rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


LOG2E = 1.0 / math.log(2.0)


def _split_attention(q, k, v, cuts):
    """States of attention over each KV segment between ``cuts``; also attention over the whole KV. LSEs
    in base 2 (FlashInfer's convention, what the public merges take)."""
    outs, lses = [], []
    bounds = [0] + cuts + [k.shape[0]]
    for a, b in zip(bounds, bounds[1:]):
        o, l = attention_ref(q, k[a:b], v[a:b], softmax_scale=q.shape[-1] ** -0.5)
        outs.append(o)
        lses.append(l.transpose(0, 1) * LOG2E)       # [heads, seq] -> [seq, heads], base 2
    whole, whole_lse = attention_ref(q, k, v, softmax_scale=q.shape[-1] ** -0.5)
    return outs, lses, whole, whole_lse.transpose(0, 1) * LOG2E


def _flashinfer_merge(v_a, s_a, v_b, s_b):
    """float64 oracle from FlashInfer's documented merge: ``s = log2(2^s_a + 2^s_b)``,
    ``v = 2^(s_a - s) v_a + 2^(s_b - s) v_b``."""
    v_a, s_a, v_b, s_b = v_a.double(), s_a.double(), v_b.double(), s_b.double()
    s = torch.log2(torch.exp2(s_a) + torch.exp2(s_b))
    return (torch.exp2(s_a - s)[..., None] * v_a + torch.exp2(s_b - s)[..., None] * v_b), s


def test_merge_state_is_base2_against_flashinfer_formula():
    torch.manual_seed(0)
    v_a, v_b = torch.randn(6, 3, 16), torch.randn(6, 3, 16)
    s_a, s_b = torch.randn(6, 3) * 4, torch.randn(6, 3) * 4
    want_v, want_s = _flashinfer_merge(v_a, s_a, v_b, s_b)
    o, l = cascade.merge_state(v_a, s_a, v_b, s_b)
    torch.testing.assert_close(o.double(), want_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l.double(), want_s, atol=1e-5, rtol=1e-5)
    o3, l3 = cascade.merge_states(torch.stack([v_a, v_b], 1), torch.stack([s_a, s_b], 1))
    torch.testing.assert_close(o3.double(), want_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l3.double(), want_s, atol=1e-5, rtol=1e-5)
    a, sa = v_a.clone(), s_a.clone()
    cascade.merge_state_in_place(a, sa, v_b, s_b)
    torch.testing.assert_close(a.double(), want_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sa.double(), want_s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cuts", [[5], [0], [23], [3, 3, 11]])
def test_merging_split_kv_equals_whole_attention(cuts):
    q, k, v = torch.randn(7, 4, 32), torch.randn(23, 4, 32), torch.randn(23, 4, 32)
    outs, lses, whole, whole_lse = _split_attention(q, k, v, cuts)
    if len(outs) == 2:
        o, l = cascade.merge_state(outs[0], lses[0], outs[1], lses[1])
    else:
        o, l = cascade.merge_states(torch.stack(outs, 1), torch.stack(lses, 1))
    assert rel_err(o, whole) < 1e-5
    torch.testing.assert_close(l, whole_lse, atol=1e-5, rtol=1e-5)


def test_empty_states_never_nan():
    v = torch.randn(3, 2, 16)
    s = torch.randn(3, 2)
    empty = torch.full((3, 2), float("-inf"))
    o, l = ref.merge_state(v, s, torch.randn(3, 2, 16), empty)
    torch.testing.assert_close(o, v)
    torch.testing.assert_close(l, s)
    o, l = ref.merge_state(v, empty, v, empty)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(l).all()


def test_in_place_with_mask():
    v, s = torch.randn(4, 2, 16), torch.randn(4, 2)
    vo, so = torch.randn(4, 2, 16), torch.randn(4, 2)
    v0, s0 = v.clone(), s.clone()
    mask = torch.tensor([True, False, True, False])
    cascade.merge_state_in_place(v, s, vo, so, mask)
    full_o, full_l = ref.merge_state(v0, s0, vo, so, base2=True)
    torch.testing.assert_close(v[mask], full_o[mask])
    torch.testing.assert_close(s[mask], full_l[mask])
    assert torch.equal(v[~mask], v0[~mask]) and torch.equal(s[~mask], s0[~mask])


def test_validation():
    v, s = torch.randn(4, 2, 16), torch.randn(4, 2)
    with pytest.raises(TypeError, match="s_a"):
        cascade.merge_state(v, s.double(), v, s)
    with pytest.raises(ValueError, match="s_b must have shape"):
        cascade.merge_state(v, s, v, torch.randn(4, 3))
    with pytest.raises(ValueError, match="v_b must have the shape"):
        cascade.merge_state(v, s, torch.randn(5, 2, 16), torch.randn(5, 2))
    with pytest.raises(TypeError, match="mask"):
        cascade.merge_state_in_place(v, s, v, s, mask=torch.ones(4))
    with pytest.raises(ValueError, match="s must have shape"):
        cascade.merge_states(torch.randn(4, 3, 2, 16), torch.randn(4, 2, 2))


# --------------------------------------------------------------------- Triton kernels (interpreter / GPU)

def _kernel_device():
    if torch.cuda.is_available():
        return "cuda"
    if INTERPRET:
        return "cpu"
    pytest.skip("needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("dim,base2", [(64, False), (80, True)])
def test_kernels_match_reference(dim, base2):
    from pagoda.kernels.attention.merge import merge_state_fwd, merge_states_fwd

    dev = _kernel_device()
    dt = torch.float16
    seq, n, heads = 5, 3, 4
    v = torch.randn(seq, n, heads, dim, device=dev, dtype=dt)
    s = torch.randn(seq, n, heads, device=dev) * 5
    s[0, :, 0] = float("-inf")          # a row whose every state is empty
    s[1, 1, :] = float("-inf")          # one empty state
    out = torch.full((seq, heads, dim), float("nan"), device=dev, dtype=dt)
    lse = torch.full((seq, heads), float("nan"), device=dev)
    merge_states_fwd(v, s, out, lse, base2=base2)
    r, rl = ref.merge_states(v.float().cpu(), s.cpu(), base2=base2)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out.cpu(), r) < 2e-3
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(rl))
    torch.testing.assert_close(lse.cpu()[torch.isfinite(rl)], rl[torch.isfinite(rl)], atol=1e-4, rtol=1e-4)

    # Two-tensor form, in place (aliasing v_a/s_a), with a mask.
    va, sa = v[:, 0].contiguous(), s[:, 0].contiguous()
    vb, sb = v[:, 1].contiguous(), s[:, 1].contiguous()
    va0, sa0 = va.clone(), sa.clone()
    mask = torch.tensor([True, True, False, True, False], device=dev)
    merge_state_fwd(va, sa, vb, sb, va, sa, mask, base2=base2)
    r2, rl2 = ref.merge_state(va0.float().cpu(), sa0.cpu(), vb.float().cpu(), sb.cpu(), base2=base2)
    m = mask.cpu()
    assert rel_err(va.cpu()[m], r2[m]) < 2e-3
    assert torch.equal(va.cpu()[~m], va0.cpu()[~m])
    fin = torch.isfinite(rl2[m])
    torch.testing.assert_close(sa.cpu()[m][fin], rl2[m][fin], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_public_ops_split_attention(dtype):
    q = torch.randn(300, 8, 128, device="cuda")
    k = torch.randn(1000, 8, 128, device="cuda")
    v = torch.randn(1000, 8, 128, device="cuda")
    outs, lses, whole, whole_lse = _split_attention(q, k, v, [100, 100, 700])
    o, l = cascade.merge_states(torch.stack(outs, 1).to(dtype), torch.stack(lses, 1))
    assert rel_err(o, whole) < 1e-2
    torch.testing.assert_close(l, whole_lse, atol=1e-3, rtol=1e-4)
    a, sa = outs[0].to(dtype).clone(), lses[0].clone()
    cascade.merge_state_in_place(a, sa, outs[2].to(dtype), lses[2])
    o2, l2 = cascade.merge_state(a, sa, outs[3].to(dtype), lses[3])   # [0,100) + [100,700) + [700,1000)
    assert rel_err(o2, whole) < 1e-2
    torch.testing.assert_close(l2, whole_lse, atol=1e-3, rtol=1e-4)

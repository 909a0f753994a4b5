"""pagoda.ops.sampling: laws of the samplers (many draws, fixed seeds), filters, reproducibility,
per-row parameters, speculative verification, robustness and validation.

Statistical tests run on the CPU path (the sort-based reference) and, marked gpu, on the Triton kernels.
"""

import pytest
import torch

import pagoda.sampling as S
from pagoda.reference import sampling as ref
from tests.ops.sampling_laws import N, _gen, _k_first_keep, _many, _rows, assert_law

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


# ------------------------------------------------------------------------------------ laws of the samplers

@pytest.mark.parametrize("device", DEVICES)
def test_sampling_from_probs_law_and_unnormalised_rows(device):
    p = _rows(50, device=device, temp=1.5)
    out = S.sampling_from_probs(p * 3.0, indices=_many(device), generator=_gen(device))
    assert out.dtype == torch.int64 and out.shape == (N,)
    assert_law(out, p[0])
    out32 = S.sampling_from_probs(p.expand(7, 50).contiguous(), generator=_gen(device))
    assert out32.dtype == torch.int32 and out32.shape == (7,)


def test_outputs_sharing_rows_draw_from_their_own_row_without_a_row_each():
    """CPU path: millions of outputs over a few rows (FlashInfer's ``indices``) are drawn per source row, in memory
    of the rows plus the outputs: 2M outputs of a 64k vocabulary would need a TB as one row each."""
    g = torch.Generator().manual_seed(0)
    vocab = 1 << 16
    p = torch.zeros(3, vocab)
    p[0, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p[2, 7] = 1.0                                   # row 1 stays all zero: nothing valid to draw
    idx = torch.tensor([0, 2, 1] * 700_000, dtype=torch.int32)
    out, valid = S.sampling_from_probs(p, indices=idx, generator=g, return_valid=True)
    assert out.dtype == torch.int32 and out.shape == idx.shape
    assert valid.tolist()[:3] == [True, True, False] and not valid[2::3].any() and valid[0::3].all()
    assert (out[1::3] == 7).all() and (out[2::3] == 0).all()
    freq = torch.bincount(out[0::3].long(), minlength=4)[:4].double() / 700_000
    torch.testing.assert_close(freq, p[0, :4].double(), atol=3e-3, rtol=0)
    logits = torch.full((2, vocab), float("-inf"))
    logits[0, 3], logits[1, 9] = 0.0, 0.0
    got = S.sampling_from_logits(logits, indices=torch.tensor([1, 0] * 500_000), generator=g)
    assert got.dtype == torch.int64 and (got[0::2] == 9).all() and (got[1::2] == 3).all()
    # Filters shared by every output filter each source row once: top-k 2 of row 0 keeps tokens 2 and 3.
    for call in (lambda i: S.top_k_sampling_from_probs(p, 2, indices=i, generator=g),
                 lambda i: S.top_k_top_p_sampling_from_probs(p, 2, 0.99, indices=i, generator=g)):
        out = call(idx)
        freq = torch.bincount(out[0::3].long(), minlength=4)[:4].double() / 700_000
        torch.testing.assert_close(freq, torch.tensor([0.0, 0.0, 3 / 7, 4 / 7], dtype=torch.float64), atol=3e-3,
                                   rtol=0)
        assert (out[1::3] == 7).all()
    # A parameter per output keeps one row per output (each output its own filter).
    ks = torch.tensor([1, 4] * 2)
    out = S.top_k_sampling_from_probs(p[:1], ks, indices=torch.zeros(4, dtype=torch.int32), generator=g)
    assert out[0] == 3 and out[2] == 3


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_from_logits_law(device):
    x = torch.randn(1, 40, device=device) * 2
    x[0, 5] = float("-inf")
    out = S.sampling_from_logits(x, indices=_many(device), generator=_gen(device))
    assert_law(out, torch.softmax(x[0].double(), -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_p", [0.2, 0.6, 0.95, 1.0])
def test_top_p_law(device, top_p):
    p = _rows(64, device=device, temp=2.0)
    out = S.top_p_sampling_from_probs(p, top_p, indices=_many(device), generator=_gen(device))
    keep = ref.keep_top_p(p.cpu().double(), torch.tensor([top_p], dtype=torch.float64))[0]
    assert_law(out, torch.where(keep, p[0].cpu().double(), 0.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k", [1, 5, 64, 100])
def test_top_k_law(device, top_k):
    p = _rows(64, device=device, temp=2.0)
    out = S.top_k_sampling_from_probs(p, top_k, indices=_many(device), generator=_gen(device))
    order = p[0].cpu().double().argsort(descending=True)
    want = torch.zeros(64, dtype=torch.float64)
    want[order[:top_k]] = p[0].cpu().double()[order[:top_k]]
    assert_law(out, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("min_p", [0.0, 0.1, 0.5])
def test_min_p_law(device, min_p):
    p = _rows(64, device=device, temp=2.0)
    out = S.min_p_sampling_from_probs(p, min_p, indices=_many(device), generator=_gen(device))
    p64 = p[0].cpu().double()
    assert_law(out, torch.where(p64 >= min_p * p64.max(), p64, 0.0))


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_filter_orders(device):
    # top_k=2 then top_p=0.5 on the renormalised pair (0.57, 0.43) keeps only token 0; "joint" keeps
    # tokens passing both filters on the original row: {0, 1}.
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]], device=device)
    n = 4000
    first = S.top_k_top_p_sampling_from_probs(p, 2, 0.5, indices=_many(device, n), generator=_gen(device))
    assert (first == 0).all()
    joint = S.top_k_top_p_sampling_from_probs(p, 2, 0.5, indices=_many(device, n), filter_apply_order="joint",
                                              generator=_gen(device))
    assert_law(joint, torch.tensor([0.4, 0.3, 0.0, 0.0]))
    logits = p.log()
    first = S.top_k_top_p_sampling_from_logits(logits, 2, 0.5, indices=_many(device, n), generator=_gen(device))
    assert (first == 0).all()
    joint = S.top_k_top_p_sampling_from_logits(logits, torch.full((n,), 2, device=device), 0.5,
                                               indices=_many(device, n), filter_apply_order="joint",
                                               generator=_gen(device))
    assert_law(joint, torch.tensor([0.4, 0.3, 0.0, 0.0]))


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_parameters_reach_their_rows(device):
    p = _rows(30, n_rows=2, device=device, temp=1.5)
    n = 8000
    idx = torch.arange(n, device=device) % 2
    top_k = torch.where(idx == 0, 1, 30).to(torch.int32)
    top_p = torch.where(idx == 0, 1.0, 0.7)
    out = S.top_k_top_p_sampling_from_probs(p, top_k, top_p, indices=idx, filter_apply_order="joint",
                                            generator=_gen(device))
    assert (out[0::2] == p[0].argmax()).all()
    keep = ref.keep_top_p(p[1:].cpu().double(), torch.tensor([0.7], dtype=torch.float64))[0]
    assert_law(out[1::2], torch.where(keep, p[1].cpu().double(), 0.0))
    # the default "top_k_first" order with per-row top_k through indices (the GPU floor path)
    out = S.top_k_top_p_sampling_from_probs(p, top_k, top_p, indices=idx, generator=_gen(device))
    assert (out[0::2] == p[0].argmax()).all()
    assert_law(out[1::2], torch.where(keep, p[1].cpu().double(), 0.0))
    # min-p per row: row 0 at min_p=1 is greedy, row 1 at min_p=0 is the full distribution
    out = S.min_p_sampling_from_probs(p, torch.where(idx == 0, 1.0, 0.0), indices=idx, generator=_gen(device))
    assert (out[0::2] == p[0].argmax()).all()
    assert_law(out[1::2], p[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["top_k_first", "joint"])
def test_top_k_top_p_law_per_request(device, order):
    """Both filter orders with per-request top_k/top_p tensors through indices: each row's draws follow
    p restricted to the reference's kept set, renormalised (excluded tokens never drawn). Row 2 is flat
    with a large top_k, row 3's top_k is off (0: top-p alone), row 4 is tied at the boundary. (The
    kernels' k-th-value fallback needs rows longer than twice the lanes: the interpreter tests and
    test_gpu_large_vocab_top_k_top_p_exact cover it.)"""
    vocab, rows, n = 64, 5, 6000
    p = _rows(vocab, n_rows=rows, temp=1.0)
    p[1] = _rows(vocab, temp=0.3)[0]
    p[2] = _rows(vocab, temp=0.2)[0]
    p[4, 5:40] = p[4, 4]
    p = (p / p.sum(-1, keepdim=True)).to(device)
    k_rows = torch.tensor([5, 20, 40, 0, 20], dtype=torch.int32)
    p_rows = torch.tensor([0.8, 0.5, 0.9, 0.7, 0.6])
    idx = torch.arange(rows * n, device=device) % rows
    out = S.top_k_top_p_sampling_from_probs(p, k_rows.to(device)[idx.cpu()].to(device), p_rows.to(device)[idx.cpu()],
                                            indices=idx, filter_apply_order=order, generator=_gen(device))
    p64 = p.double().cpu()
    if order == "top_k_first":
        keep = _k_first_keep(p64, k_rows, p_rows.double())
    else:
        keep = ref.keep_top_k(p64, k_rows) & ref.keep_top_p(p64, p_rows.double())
    for r in range(rows):
        assert_law(out[r::rows], torch.where(keep[r], p64[r], 0.0))
    if order == "top_k_first":  # the two orders differ on these rows: the test tells them apart
        joint = ref.keep_top_k(p64, k_rows) & ref.keep_top_p(p64, p_rows.double())
        assert not torch.equal(keep, joint)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_from_logits_both_orders(device):
    vocab, n = 200, 8000
    logits = torch.randn(1, vocab, device=device) * 2.0
    p64 = torch.softmax(logits.double().cpu(), -1)
    for order, keep in (("top_k_first", _k_first_keep(p64, torch.tensor([30]), torch.tensor([0.6]).double())),
                        ("joint", ref.keep_top_k(p64, torch.tensor([30]))
                         & ref.keep_top_p(p64, torch.tensor([0.6]).double()))):
        out = S.top_k_top_p_sampling_from_logits(logits, 30, 0.6, indices=_many(device, n), filter_apply_order=order,
                                                 generator=_gen(device))
        assert_law(out, torch.where(keep[0], p64[0], 0.0))


# ------------------------------------------------------------------------------- reproducibility / RNG

@pytest.mark.parametrize("device", DEVICES)
def test_same_generator_state_gives_same_tokens(device):
    p = _rows(100, n_rows=64, device=device, temp=0.5)
    a = S.top_p_sampling_from_probs(p, 0.9, generator=_gen(device, 7))
    b = S.top_p_sampling_from_probs(p, 0.9, generator=_gen(device, 7))
    assert torch.equal(a, b)
    g = _gen(device, 7)
    first, second = S.top_p_sampling_from_probs(p, 0.9, generator=g), S.top_p_sampling_from_probs(p, 0.9, generator=g)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances
    c = S.top_p_sampling_from_probs(p, 0.9, generator=_gen(device, 8))
    assert not torch.equal(a, c)
    d1 = S.sampling_from_probs(p, seed=5, offset=64)
    d2 = S.sampling_from_probs(p, seed=5, offset=64)
    assert torch.equal(d1, d2)


# ------------------------------------------------------------------------------ softmax / renorm / mask

@pytest.mark.parametrize("device", DEVICES)
def test_softmax_temperature(device):
    x = torch.randn(3, 77, device=device) * 4
    t = torch.tensor([1.0, 0.3, 0.0], device=device)
    out = S.softmax(x, t)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out[:2].double(), torch.softmax(x[:2].double() / t[:2, None].double(), -1),
                               atol=1e-6, rtol=1e-5)
    assert torch.equal(out[2], torch.nn.functional.one_hot(x[2].argmax(), 77).float())
    torch.testing.assert_close(S.softmax(x), torch.softmax(x, -1), atol=1e-6, rtol=1e-5)
    greedy = S.softmax(x, 0.0)
    assert torch.equal(greedy.argmax(-1), x.argmax(-1))
    # temperature 0 is exact greedy decoding through any sampler
    assert torch.equal(S.sampling_from_probs(greedy, generator=_gen(device)).long(), x.argmax(-1))
    assert torch.equal(S.top_k_top_p_sampling_from_probs(greedy, 5, 0.9, generator=_gen(device)).long(), x.argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_renorm_and_mask_examples(device):
    p = torch.tensor([[0.2499, 0.2592, 0.1085, 0.2718, 0.1106],
                      [0.2205, 0.0942, 0.2912, 0.3452, 0.0489]], device=device)
    r = S.top_p_renorm_probs(p, 0.3)
    assert (r.cpu() > 0).tolist() == [[False, True, False, True, False], [False, False, False, True, False]]
    torch.testing.assert_close(r.sum(-1), torch.ones(2, device=device))
    r = S.top_k_renorm_probs(p, 3)
    assert (r.cpu() > 0).tolist() == [[True, True, False, True, False], [True, False, True, True, False]]
    torch.testing.assert_close(r[0, 1].cpu(), torch.tensor(0.2592 / (0.2499 + 0.2592 + 0.2718)))
    x = torch.tensor([[1.0, 3.0, 3.0, -1.0, 2.0]], device=device, dtype=torch.float16)
    m = S.top_k_mask_logits(x, 2)
    assert m.dtype == torch.float16
    assert m.cpu().tolist() == [[float("-inf"), 3.0, 3.0, float("-inf"), float("-inf")]]
    assert S.top_k_mask_logits(x, 1).isfinite().sum() == 2  # ties at the boundary are kept
    assert torch.equal(S.top_k_mask_logits(x, 5), x)


@pytest.mark.parametrize("device", DEVICES)
def test_renorm_matches_reference_random(device):
    p = _rows(1000, n_rows=5, device=device, temp=3.0)
    for fn, param in ((S.top_p_renorm_probs, torch.tensor([0.1, 0.5, 0.8, 0.95, 1.0])),
                      (S.top_k_renorm_probs, torch.tensor([1, 10, 100, 999, 1000]))):
        out = fn(p, param.to(device))
        want = getattr(ref, fn.__name__)(p.cpu(), param)
        assert torch.equal(out.cpu() > 0, want > 0)
        torch.testing.assert_close(out.cpu(), want, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------- speculative

@pytest.mark.parametrize("device", DEVICES)
def test_chain_speculative_flashinfer_example(device):
    draft = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]], device=device)
    ids = torch.tensor([[2, 1]], dtype=torch.int32, device=device)
    target = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]], device=device)
    acc0 = torch.full((1,), 5, dtype=torch.int32, device=device)
    out, acc, emitted = S.chain_speculative_sampling(draft, ids, target, maybe_output_accepted_token_num=acc0,
                                                     generator=_gen(device))
    assert out.tolist() == [[2, 0, -1]] and out.dtype == torch.int32
    assert acc is acc0 and acc.tolist() == [6] and emitted.tolist() == [1]


@pytest.mark.parametrize("device", DEVICES)
def test_chain_speculative_preserves_target_distribution(device):
    n_req, n_spec, vocab = 20000, 2, 6
    g = _gen(device, 3)
    # A draft close to the target (as in practice) keeps every conditional sample below large.
    target_logits = torch.randn(n_spec + 1, vocab) * 1.5
    p = torch.softmax(target_logits, -1)
    q = torch.softmax(target_logits[:n_spec] + torch.randn(n_spec, vocab) * 0.8, -1)
    q[1, p[1].argmin()] = 0.0  # a token the draft never proposes: only the residual can emit it
    q[1] /= q[1].sum()
    draft = q.expand(n_req, n_spec, vocab).contiguous().to(device)
    target = p.expand(n_req, n_spec + 1, vocab).contiguous().to(device)
    ids = torch.multinomial(draft.view(-1, vocab), 1, generator=g).view(n_req, n_spec).to(torch.int32)
    out, acc, emitted = S.chain_speculative_sampling(draft, ids, target, generator=g)
    out, acc, emitted = out.cpu(), acc.cpu(), emitted.cpu()
    assert_law(out[:, 0], p[0])
    assert_law(out[emitted >= 1, 1], p[1])
    assert (emitted == 2).sum() > 1000
    assert_law(out[emitted == 2, 2], p[2])
    rate = (emitted >= 1).double().mean().item()
    assert abs(rate - torch.minimum(p[0], q[0]).sum().item()) < 0.02
    for r in range(50):
        e = int(emitted[r])
        assert torch.equal(out[r, :e], ids[r, :e].cpu()) and (out[r, e + 1:] == -1).all()
    assert ((acc >= emitted) & (acc <= n_spec)).all()


# --------------------------------------------------------------------------------- robustness

@pytest.mark.parametrize("device", DEVICES)
def test_nan_rows_detected_or_harmless(device):
    p = _rows(20, n_rows=3, device=device)
    p[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        S.top_p_sampling_from_probs(p, 0.9, check_nan=True)
    x = torch.randn(3, 20, device=device)
    x[2] = float("-inf")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        S.sampling_from_logits(x, check_nan=True)
    p[1] = float("nan")
    for fn in (lambda: S.top_p_sampling_from_probs(p, 0.9, return_valid=True),
               lambda: S.top_k_sampling_from_probs(p, 3, return_valid=True),
               lambda: S.min_p_sampling_from_probs(p, 0.1, return_valid=True),
               lambda: S.sampling_from_probs(p, return_valid=True)):
        out, valid = fn()
        assert ((out >= 0) & (out < 20)).all() and valid.tolist() == [True, False, True]


# --------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("call,err,match", [
    (lambda p: S.top_p_sampling_from_probs(p, 0.0), ValueError, "top_p"),
    (lambda p: S.top_p_sampling_from_probs(p, 1.5), ValueError, "top_p"),
    (lambda p: S.top_k_sampling_from_probs(p, 0), ValueError, "top_k"),
    (lambda p: S.top_k_sampling_from_probs(p, 2.5), TypeError, "top_k"),
    (lambda p: S.min_p_sampling_from_probs(p, -0.1), ValueError, "min_p"),
    (lambda p: S.top_p_sampling_from_probs(p, torch.full((3,), 0.5)), ValueError, "top_p"),
    (lambda p: S.top_k_sampling_from_probs(p, torch.full((4,), 2 + 0j)), TypeError, "top_k"),
    (lambda p: S.sampling_from_probs(p[0]), ValueError, "probs"),
    (lambda p: S.sampling_from_probs(p.to(torch.int32)), TypeError, "probs"),
    (lambda p: S.sampling_from_probs(p[:, :0]), ValueError, "probs"),
    (lambda p: S.sampling_from_probs(p, indices=torch.zeros(2)), TypeError, "indices"),
    (lambda p: S.sampling_from_probs(p, indices=torch.tensor([0, 4])), ValueError, "indices"),
    (lambda p: S.sampling_from_probs(p[:0], indices=torch.tensor([0])), ValueError, "indices"),
    (lambda p: S.sampling_from_probs(p, seed=1), ValueError, "seed"),
    (lambda p: S.sampling_from_probs(p, generator=3), TypeError, "generator"),
    (lambda p: S.top_k_top_p_sampling_from_probs(p, 2, 0.5, filter_apply_order="both"), ValueError,
     "filter_apply_order"),
    (lambda p: S.softmax(p, temperature=-1.0), ValueError, "temperature"),
    (lambda p: S.top_k_mask_logits(p, 0), ValueError, "top_k"),
    (lambda p: S.top_p_renorm_probs(p, "0.5"), TypeError, "top_p"),
])
def test_validation(call, err, match):
    with pytest.raises(err, match=match):
        call(_rows(10, n_rows=4))


def test_chain_speculative_validation():
    q, p = _rows(8, 6).view(2, 3, 8), _rows(8, 8).view(2, 4, 8)
    ids = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="target_probs"):
        S.chain_speculative_sampling(q, ids, p[:, :3])
    with pytest.raises(ValueError, match="draft_token_ids"):
        S.chain_speculative_sampling(q, ids[:, :2], p)
    with pytest.raises(TypeError, match="draft_token_ids"):
        S.chain_speculative_sampling(q, ids.float(), p)
    with pytest.raises(ValueError, match="draft_token_ids"):
        S.chain_speculative_sampling(q, ids + 8, p)
    with pytest.raises(ValueError, match="maybe_output_accepted_token_num"):
        S.chain_speculative_sampling(q, ids, p, maybe_output_accepted_token_num=torch.zeros(3, dtype=torch.int32))


def test_cpu_outputs_and_defaults_match_flashinfer_conventions():
    p = _rows(10, n_rows=4)
    out, valid = S.top_k_top_p_sampling_from_probs(p, 3, 0.9, return_valid=True)
    assert out.dtype == torch.int32 and valid.dtype == torch.bool and valid.all()
    idx = torch.tensor([3, 3, 0], dtype=torch.int32)
    assert S.top_p_sampling_from_probs(p, 0.9, indices=idx).dtype == torch.int32
    assert S.top_k_renorm_prob is S.top_k_renorm_probs and S.top_p_renorm_prob is S.top_p_renorm_probs
    assert S.top_k_renorm_probs(p.half(), 3).dtype == torch.float16

"""The Triton sampling kernels under TRITON_INTERPRET=1 on the CPU (fp32/fp16, small sizes).

The interpreter runs ~20-60 ms per program, so statistics over many draws live in the GPU tests
(tests/ops/test_sampling.py). Here the samplers are checked EXACTLY where the draw is one race: with
the kernel's own exponentials dumped, a row whose kept set N lies among the tracked tokens (vocab <=
2 * BLOCK) must return ``argmax_{i in N} p_i / E_i`` with N from the sort-based reference, and an
unfiltered row the two-level draw (lane by mass, then token of the lane). That pins down the filters
and the thresholds, not just the law. Rows that need rejection rounds (more tokens than tracked) are
checked for membership over many draws and by a frequency test; a distribution test checks the
exponentials themselves.
"""
import math
import os
import warnings

import numpy as np
import pytest
import torch

from pagoda.reference import sampling as ref
from tests.kernels.sampling_probs import probs as _probs

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                       reason="interpreter tests run only where TRITON_INTERPRET=1 (no CUDA)"),
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
]

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from pagoda.kernels.sampling import filters as F  # noqa: E402
from pagoda.kernels.sampling import row as K  # noqa: E402

warnings.filterwarnings("ignore", "divide by zero", RuntimeWarning)


@triton.jit
def _dump_exponentials(out_ptr, seed, off, vocab, BLOCK: tl.constexpr):
    # The logits race's token -> (Philox counter, lane) map, chunk by chunk (must use the same BLOCK).
    pid = tl.program_id(0)
    base = off + pid.to(tl.int64) * K._chunk_row_quads(vocab, BLOCK)
    Q: tl.constexpr = BLOCK // 4
    offs = tl.arange(0, Q)
    for start in range(0, vocab, BLOCK):
        rs = K._philox_chunk(seed, base, start, offs)
        for j in tl.static_range(4):
            cols = start + j * Q + offs
            tl.store(out_ptr + pid * vocab + cols, K._exp1(rs[j]), mask=cols < vocab)


@triton.jit
def _dump_stage(out_ptr, seed, off, vocab, stage, N: tl.constexpr):
    # The probability samplers' exponentials of one draw stage, for indices 0..N-1 of every row.
    pid = tl.program_id(0)
    idx = tl.arange(0, N)
    e = K._exp_at(seed, off + pid.to(tl.int64) * ((vocab + 3) // 4), idx, stage)
    tl.store(out_ptr + pid * N + idx, e)


def _exponentials(batch, vocab, seed, offset, block=16):
    out = torch.empty(batch, vocab)
    _dump_exponentials[(batch,)](out, seed, offset, vocab, BLOCK=block)
    return out


def _stage(batch, vocab, seed, offset, stage, n=None):
    n = triton.next_power_of_2(n or vocab)
    out = torch.empty(batch, n)
    _dump_stage[(batch,)](out, seed, offset, vocab, stage, N=n)
    return out.numpy()


def _race(p32: torch.Tensor, keep: torch.Tensor, e: np.ndarray, block: int, floor=None) -> torch.Tensor:
    """argmax over the kept, positive tokens of p/E (float32 numpy like the kernel). With vocab <=
    2 * BLOCK lane l holds tokens l and l + BLOCK; E is that of the token's entry ``l + slot * BLOCK``,
    slot 0 for the larger (first on ties) of the lane's eligible values."""
    p = p32.numpy().astype(np.float32)
    b, v = p.shape
    assert v <= 2 * block
    elig = p > 0
    if floor is not None:
        elig &= p >= floor.numpy()[:, None]
    w = np.where(elig, p, 0.0)
    ent = np.arange(v)[None, :].repeat(b, 0)
    for t in range(block, v):  # the second token of lane t - block
        u = t - block
        first_is_u = w[:, u] >= w[:, t]
        ent[:, t] = np.where(first_is_u, t, u)
        ent[:, u] = np.where(first_is_u, u, t)
    with np.errstate(divide="ignore"):
        keys = p / np.take_along_axis(e, ent, 1).astype(np.float32)
    keys = np.where(keep.numpy() & elig, keys, -1.0)
    return torch.from_numpy(keys.argmax(-1))


def _two_level(p32: torch.Tensor, block: int, seed: int, offset: int) -> torch.Tensor:
    """The unfiltered draw: lane l (tokens l, l + BLOCK, ...) by the race over lane masses (stage 2),
    then a token of that lane by the race over its p (stage 3)."""
    b, v = p32.shape
    p = p32.numpy().astype(np.float32)
    e_lane, e_tok = _stage(b, v, seed, offset, 2, block), _stage(b, v, seed, offset, 3)
    out = []
    for r in range(b):
        w = np.zeros(block, np.float32)
        for t in range(v):
            w[t % block] += np.float32(max(p[r, t], 0.0))
        lane = int(np.argmax(np.where(w > 0, w / e_lane[r, :block], -1.0)))
        toks = np.arange(lane, v, block)
        out.append(int(toks[np.argmax(np.where(p[r, toks] > 0, p[r, toks] / e_tok[r, toks], -1.0))]))
    return torch.tensor(out)


def _run(x, rows=None, top_k=None, top_p=None, min_p=None, seed=1234, offset=0, block=16, from_logits=False,
         floor=None, k_first=False):
    batch = x.shape[0] if rows is None else rows.shape[0]
    out = torch.full((batch,), -7, dtype=torch.int32 if rows is None else rows.dtype)
    valid = torch.zeros(batch, dtype=torch.bool)
    K.sample(x, out, valid, rows, top_k, top_p, min_p, seed, offset, from_logits=from_logits, block=block,
             floor=floor, k_first=k_first)
    return out, valid


@pytest.mark.parametrize("dtype,vocab,block", [(torch.float32, 5, 16), (torch.float32, 37, 32),
                                               (torch.float16, 37, 32)])
def test_plain_and_filters_equal_race_oracle(dtype, vocab, block):
    b = 6
    p = _probs(b, vocab, dtype)
    p32 = p.float()
    e = _stage(b, vocab, 99, 8, 1, 2 * block)  # vocab <= 2 * BLOCK: every token tracked, one race over N
    k = torch.tensor([1, 2, 3, 5, vocab, 0], dtype=torch.int32)
    tp = torch.tensor([0.05, 0.3, 0.6, 0.9, 1.0, 0.5])
    mp = torch.tensor([0.0, 0.1, 0.3, 0.5, 1.0, 1.5])  # min_p > 1 (tensors are not range-checked): greedy
    cases = {
        "top_k": (dict(top_k=k), ref.keep_top_k(p32.double(), k)),
        "top_p": (dict(top_p=tp), ref.keep_top_p(p32.double(), tp.double())),
        "min_p": (dict(min_p=mp), ref.keep_min_p(p32.double(), mp.double())),
        "joint": (dict(top_k=k, top_p=tp), ref.keep_top_k(p32.double(), k) & ref.keep_top_p(p32.double(), tp.double())),
        "all": (dict(top_k=k, top_p=tp, min_p=mp), ref.keep_top_k(p32.double(), k)
                & ref.keep_top_p(p32.double(), tp.double()) & ref.keep_min_p(p32.double(), mp.double())),
    }
    floor = torch.full((b,), float("nan"))
    F.top_k_floor(p, floor, k, block=16)
    keep_k = ref.keep_top_k(p32.double(), k)
    cases["top_k_first"] = (dict(top_p=tp, floor=floor),
                            keep_k & ref.keep_top_p(torch.where(keep_k, p32.double(), 0.0), tp.double()))
    # one launch, the k-th value found in the kernel from the tracked values: the same race
    cases["top_k_first_fused"] = (dict(top_k=k, top_p=tp, k_first=True), cases["top_k_first"][1])
    for name, (kw, keep) in cases.items():
        out, valid = _run(p, seed=99, offset=8, block=block, **kw)
        assert valid.all(), name
        fl = floor if "top_k_first" in name else None
        assert torch.equal(out.long(), _race(p32, keep, e, block, fl)), name
        assert keep[torch.arange(b), out.long()].all(), name
    out, valid = _run(p, seed=99, offset=8, block=block)
    assert valid.all() and torch.equal(out.long(), _two_level(p32, block, 99, 8))
    p[1, 3] = 0.0
    out, valid = _run(p, seed=5, offset=0, block=16)  # lanes of up to 3 tokens
    assert valid.all() and torch.equal(out.long(), _two_level(p.float(), min(16, vocab if vocab > 16 else 16), 5, 0))


@pytest.mark.parametrize("name", ["top_k", "top_p", "min_p", "joint", "top_k_first", "top_k_first_fused"])
def test_rejection_rounds_keep_to_the_filter(name):
    """Rows with more tokens than tracked (4 per lane here, flat rows so the kept sets are large):
    the rejection rounds. Every draw is inside the reference's kept set."""
    vocab, b = 64, 12
    p = _probs(b, vocab, temp=0.4)
    p[3, :] = p[3, 0]  # all tied
    p[4, 10:40] = 0.0
    p32 = p.double()
    k = torch.tensor([1, 2, 5, 20, 40, 63, 64, 0, 33, 7, 50, 30], dtype=torch.int32)
    tp = torch.tensor([0.05, 0.3, 0.6, 0.9, 0.99, 0.5, 0.7, 0.95, 0.8, 0.999, 0.85, 0.75])
    mp = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 0.2, 0.6, 0.05, 0.4, 0.7, 0.8, 0.95])
    kw, keep = {
        "top_k": (dict(top_k=k), ref.keep_top_k(p32, k)),
        "top_p": (dict(top_p=tp), ref.keep_top_p(p32, tp.double())),
        "min_p": (dict(min_p=mp), ref.keep_min_p(p32, mp.double())),
        "joint": (dict(top_k=k, top_p=tp, min_p=mp * 0.3),
                  ref.keep_top_k(p32, k) & ref.keep_top_p(p32, tp.double()) & ref.keep_min_p(p32, mp.double() * 0.3)),
        "top_k_first": (None, None),
        "top_k_first_fused": (None, None),
    }[name]
    if name.startswith("top_k_first"):
        floor = torch.empty(b)
        F.top_k_floor(p, floor, k, block=16)
        keep_k = ref.keep_top_k(p32, k)
        keep = keep_k & ref.keep_top_p(torch.where(keep_k, p32, 0.0), tp.double())
        kw = dict(top_p=tp, floor=floor) if name == "top_k_first" else dict(top_k=k, top_p=tp, k_first=True)
    for seed in range(4):
        out, valid = _run(p, seed=seed, **kw)
        assert valid.all() and ((out >= 0) & (out < vocab)).all()
        assert keep[torch.arange(b), out.long()].all(), (name, seed)


def test_rejection_rounds_follow_the_law():
    """One flat row of 64 tokens (16 lanes of 4), top-p 0.6 and top-k 20: many rejection-round draws
    follow p restricted to N and renormalised."""
    vocab, n = 64, 160
    p = torch.softmax(torch.linspace(1.0, 0.0, vocab), -1)[None]
    rows = torch.zeros(n, dtype=torch.int32)
    top_k = torch.full((n,), 20, dtype=torch.int32)
    for kw, keep in ((dict(top_p=torch.full((n,), 0.6)), ref.keep_top_p(p.double(), torch.tensor([0.6]).double())),
                     (dict(top_k=top_k), ref.keep_top_k(p.double(), torch.tensor([20])))):
        out, valid = _run(p, rows=rows, seed=11, **kw)
        assert valid.all()
        want = torch.where(keep[0], p[0].double(), 0.0)
        want = want / want.sum()
        counts = torch.bincount(out.long(), minlength=vocab).double()
        assert counts[~keep[0]].sum() == 0
        # coarse chi-square on 4 groups of kept tokens (ordered by probability)
        idx = torch.nonzero(keep[0]).flatten()
        groups = idx.chunk(4)
        obs = torch.stack([counts[g].sum() for g in groups])
        exp = torch.stack([n * want[g].sum() for g in groups])
        chi2 = (((obs - exp) ** 2) / exp).sum()
        assert chi2 < 20.0, (kw.keys(), obs, exp)  # df = 3: P(chi2 > 20) ~ 2e-4


@triton.jit
def _kth_probe(x_ptr, k_ptr, out_ptr, path_ptr, same_ptr, stride, vocab, BLOCK: tl.constexpr):
    # The K_FIRST floor exactly as _sample_kernel finds it, and which stage settled it: 0 = pass 0's
    # tracked values, 1 = the peeled pass, 2 = the counting bisection.
    pid = tl.program_id(0)
    base = x_ptr + pid * stride
    lanes = tl.arange(0, BLOCK)
    k = tl.load(k_ptr + pid)
    tot, v1, v2, v3 = K._track_pass(base, 1, vocab, lanes, BLOCK, True)
    one = tl.full((BLOCK,), 1, tl.int32)
    zero = tl.zeros((BLOCK,), tl.int32)
    m3 = tl.max(v3, 0).to(tl.int32, bitcast=True)
    t_k = K._count_cut(one, v1, one, v2, zero, v1, zero, v1, k, tl.zeros((), tl.int32),
                       tl.max(v1, 0).to(tl.int32, bitcast=True) + 1)
    bits = tl.maximum(t_k, 1)
    path = tl.zeros((), tl.int32)
    if bits <= m3:
        bits, peeled, c2, e1, e2 = K._kth_value_bits(base, v1, v2, t_k, m3, k, vocab, lanes, BLOCK)
        path = tl.where(peeled, 1, 2)
        # where the peel settled it, the floor set's state from the peeled entries == a pass over it
        tot2, w1, w2, w3 = K._peeled_floor_set(v1, v2, c2, e1, e2, bits)
        tot3, u1, u2, u3 = K._track_pass(base, bits, vocab, lanes, BLOCK, True)
        same = tl.sum(((w1 != u1) | (w2 != u2) | (w3 != u3) | (tl.abs(tot2 - tot3) > 1e-6 * tot3)).to(tl.int32), 0)
        tl.store(same_ptr + pid, tl.where(peeled, same, 0))
    tl.store(out_ptr + pid, bits.to(tl.float32, bitcast=True))
    tl.store(path_ptr + pid, path)


def test_top_k_first_kth_value_is_exact():
    """The in-kernel k-th value (the "top_k_first" floor) for every k on rows with ties, zeros and NaN,
    from pass 0's tracked values, the peeled pass and the counting bisection (all three reached)."""
    vocab, block = 150, 16  # 16 lanes of ~9 tokens: small k settle in pass 0, large ones need passes
    p = _probs(6, vocab, temp=1.0)
    p[1, 20:60] = p[1, 7]  # a wide tie
    p[2, ::3] = 0.0
    p[3, 9] = float("nan")
    p[4] = torch.linspace(1.0, 2.0, vocab)[torch.randperm(vocab)]  # flat: every lane holds many of the top
    p[5, 100:] = 0.0
    stages = set()
    # k around every size where the path can change (the interpreter takes ~4 s a launch: not every k)
    for k in [1, 3, 6, 13, 22, 39, 64, 65, 100, 101, 149]:
        kk = torch.full((6,), k, dtype=torch.int32)
        out = torch.full((6,), float("nan"))
        path = torch.full((6,), -1, dtype=torch.int32)
        mismatches = torch.zeros(6, dtype=torch.int32)
        _kth_probe[(6,)](p, kk, out, path, mismatches, p.stride(0), vocab, BLOCK=block)
        assert (mismatches == 0).all(), (k, mismatches)
        pos = torch.where(p > 0, p, 0.0).nan_to_num(0.0)
        kth = pos.sort(-1, descending=True).values[:, k - 1]
        want = torch.where(kth > 0, kth, torch.tensor(1.401298464324817e-45))  # fewer than k positive: no bound
        assert torch.equal(out, want), (k, out, want)
        for r in range(6):
            assert int(path[r]) == 0 or int(path[r]) == (1 if _peel_settles(pos[r], float(want[r]), block) else 2)
            stages.add(int(path[r]))
    assert stages == {0, 1, 2}, stages


def _peel_settles(row, cut, block):
    """Model of the peeled pass: per lane v1, v2 (two largest), then e3 = the third largest value
    strictly below v2; the cut is settled iff it lies above every lane's e3."""
    m = 0.0
    for lane in range(block):
        vals = sorted((float(v) for v in row[lane::block] if v > 0), reverse=True)
        v2 = vals[1] if len(vals) > 1 else 0.0
        rest = [v for v in vals if v < v2]
        m = max(m, rest[2] if len(rest) > 2 else 0.0)
    return cut > m


def test_top_k_first_fused_follows_the_law():
    """top_k_first in one launch on rows longer than the tracked values (flat, 64 tokens in 16 lanes):
    top_k 6 settles in pass 0 only sometimes, top_k 30 always needs the k-th value passes; the draws
    follow p restricted to the reference's set, renormalised."""
    vocab, n = 64, 112
    p = torch.softmax(torch.linspace(1.0, 0.0, vocab)[torch.randperm(vocab)], -1)[None]
    rows = torch.zeros(n, dtype=torch.int32)
    p64 = p.double()
    for k, tp in ((30, 0.7), (6, 0.9)):
        keep_k = ref.keep_top_k(p64, torch.tensor([k]))
        keep = keep_k & ref.keep_top_p(torch.where(keep_k, p64, 0.0), torch.tensor([tp]).double())
        out, valid = _run(p, rows=rows, seed=3, top_k=torch.full((n,), k, dtype=torch.int32),
                          top_p=torch.full((n,), tp), k_first=True)
        assert valid.all()
        counts = torch.bincount(out.long(), minlength=vocab).double()
        assert counts[~keep[0]].sum() == 0
        want = torch.where(keep[0], p64[0], 0.0)
        want = want / want.sum()
        idx = torch.nonzero(keep[0]).flatten()
        groups = idx[want[idx].argsort(descending=True)].chunk(4)
        obs = torch.stack([counts[g].sum() for g in groups])
        exp = torch.stack([n * want[g].sum() for g in groups])
        chi2 = (((obs - exp) ** 2) / exp).sum()
        assert chi2 < 20.0, (k, obs, exp)


def test_rows_draw_independent_numbers():
    """Row 0's last tokens and row 1's first ones: with a row stride of ceil(vocab / 4) counters (the bug before
    `_chunk_row_quads`) tokens 18, 19 of row 0 took the numbers of tokens 0, 1 of row 1 (vocab 21, BLOCK 16),
    so two rows with those pairs tied always chose alike."""
    x = torch.full((2, 21), float("-inf"))
    x[0, 18:20] = 0.0
    x[1, 0:2] = 0.0
    same = 0
    for seed in range(40):
        out, valid = _run(x, seed=seed, offset=0, block=16, from_logits=True)
        assert valid.all() and out[0] in (18, 19) and out[1] in (0, 1)
        same += int((out[0] - 18) == out[1])
    assert 8 <= same <= 32, same                     # independent: Binomial(40, 1/2)


def test_logits_race_is_gumbel_max():
    x = torch.randn(4, 29) * 2
    x[1, 3:] = float("-inf")
    e = _exponentials(4, 29, 5, 0).numpy()
    out, valid = _run(x, seed=5, offset=0, from_logits=True)
    want = np.argmax(x.numpy() - np.log(e), -1)
    assert valid.all() and torch.equal(out.long(), torch.from_numpy(want))
    assert out[1] < 3


def test_logits_race_with_temperature_is_gumbel_max_of_scaled_logits():
    """Per-output temperatures (outputs mapped to rows): the race of ``x[row] / t`` with the same exponentials,
    exactly; fp16 logits are read as they are."""
    x = (torch.randn(3, 29) * 2).to(torch.float16)
    rows = torch.tensor([0, 2, 2, 1], dtype=torch.int64)
    t = torch.tensor([0.25, 1.0, 3.0, 0.7])
    out = torch.full((4,), -7, dtype=torch.int64)
    valid = torch.zeros(4, dtype=torch.bool)
    K.sample(x, out, valid, rows, None, None, None, 9, 0, from_logits=True, block=16, temperature=t)
    e = _exponentials(4, 29, 9, 0).numpy()
    scaled = x.float()[rows].numpy() / t.numpy()[:, None]
    assert valid.all() and torch.equal(out, torch.from_numpy(np.argmax(scaled - np.log(e), -1)))
    with pytest.raises(ValueError, match="temperature needs from_logits"):
        K.sample(x.float().softmax(-1), out, valid, rows, None, None, None, 9, 0, temperature=t)


def test_indices_and_per_output_parameters():
    p = _probs(3, 20)
    rows = torch.tensor([2, 0, 2, 1, 0], dtype=torch.int64)
    k = torch.tensor([1, 1, 20, 2, 3], dtype=torch.int32)
    floor = torch.empty(5)
    F.top_k_floor(p, floor, k, rows, block=16)
    kth = p[rows].sort(-1, descending=True).values.gather(1, (k.long().clamp(max=20) - 1)[:, None]).squeeze(1)
    assert torch.equal(floor, torch.where(k >= 20, p[rows].min(-1).values, kth))
    out, valid = _run(p, rows=rows, top_k=k)
    assert out.dtype == torch.int64 and valid.all()
    assert out[0] == p[2].argmax() and out[1] == p[0].argmax()
    keep = ref.keep_top_k(p[rows].double(), k)
    assert keep[torch.arange(5), out].all()


def test_degenerate_rows_never_out_of_range():
    p = _probs(5, 19)
    p[0] = 0.0
    p[1] = float("nan")
    p[2, :] = 0.0
    p[2, 11] = 1.0
    p[3, 4] = float("nan")  # one NaN entry: never drawn
    out, valid = _run(p, top_p=torch.full((5,), 0.9), top_k=torch.full((5,), 3, dtype=torch.int32))
    assert ((out >= 0) & (out < 19)).all()
    assert valid.tolist() == [False, False, True, True, True]
    assert out[0] == 0 and out[1] == 0 and out[2] == 11 and out[3] != 4
    # an out-of-range index is clamped in the kernel (the ops layer rejects it on CPU)
    out, _ = _run(p[2:3].contiguous(), rows=torch.tensor([5, -3], dtype=torch.int32))
    assert out.tolist() == [11, 11]


def test_ties_at_the_boundary_are_kept():
    p = torch.tensor([[0.3, 0.1, 0.1, 0.1, 0.1, 0.3]])
    rows = torch.zeros(24, dtype=torch.int32)
    out, _ = _run(p, rows=rows, top_k=torch.full((24,), 3, dtype=torch.int32))
    assert set(out.tolist()) <= {0, 1, 2, 3, 4, 5} and (set(out.tolist()) & {1, 2, 3, 4})
    out, _ = _run(p, rows=rows, top_k=torch.full((24,), 2, dtype=torch.int32))
    assert set(out.tolist()) == {0, 5}


def test_same_seed_same_tokens_and_offset_changes_them():
    p = _probs(8, 30, temp=0.5)
    a, _ = _run(p, seed=7, offset=4, block=32)
    b, _ = _run(p, seed=7, offset=4, block=32)
    c, _ = _run(p, seed=7, offset=4 + 8 * 8, block=32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # seeds from device tensors (the CUDA-graph form), per row or shared
    d, _ = _run(p, seed=torch.tensor([7]), offset=torch.tensor([4]), block=32)
    assert torch.equal(a, d)


@pytest.mark.parametrize("seed,offset", [(-(2 ** 62) - 12345, 2 ** 33 + 12), (2 ** 31 + 5, 2 ** 31 - 4), (-3, 0)])
def test_wide_host_seeds_and_offsets(seed, offset):
    """Host seeds and offsets of any int64 value (the kernel receives them as two int32 words): the race of
    the exponentials of that exact (seed, offset), as from device tensors."""
    from pagoda.kernels.sampling.race import int32_words

    lo, hi = int32_words(seed)
    assert all(-2 ** 31 <= w < 2 ** 31 for w in (lo, hi)) and (hi << 32) + (lo & 0xFFFFFFFF) == seed
    x = torch.randn(3, 29) * 2
    e = _exponentials(3, 29, seed, offset).numpy()
    out, valid = _run(x, seed=seed, offset=offset, from_logits=True)
    assert valid.all() and torch.equal(out.long(), torch.from_numpy(np.argmax(x.numpy() - np.log(e), -1)))
    dev, _ = _run(x, seed=torch.tensor([seed]), offset=torch.tensor([offset]), from_logits=True)
    assert torch.equal(out, dev)


def test_scalar_parameters_equal_their_tensor_form():
    """Python-number top_k / top_p / min_p go in as kernel arguments (no [batch] tensor): same tokens."""
    p = _probs(6, 70)
    for kw in (dict(top_k=5), dict(top_p=0.6), dict(min_p=0.2), dict(top_k=4, top_p=0.7),
               dict(top_k=3, top_p=0.8, k_first=True), dict(top_k=500)):
        tensors = {k: torch.full((6,), v, dtype=torch.int32 if k == "top_k" else torch.float32)
                   for k, v in kw.items() if k != "k_first"}
        a, va = _run(p, seed=11, offset=4, block=32, **kw)
        b, vb = _run(p, seed=11, offset=4, block=32, k_first=kw.get("k_first", False), **tensors)
        assert torch.equal(a, b) and torch.equal(va, vb), kw
    # a scalar beside a tensor: every parameter goes in as a tensor
    a, _ = _run(p, seed=11, offset=4, block=32, top_k=torch.full((6,), 4, dtype=torch.int32), top_p=0.7)
    b, _ = _run(p, seed=11, offset=4, block=32, top_k=4, top_p=0.7)
    assert torch.equal(a, b)


def test_exponentials_are_exp1_down_to_the_tail():
    e = _exponentials(64, 4096, 21, 0, block=4096).double().flatten()  # 262144 draws
    assert (e > 0).all() and e.isfinite().all()
    assert abs(e.mean().item() - 1.0) < 0.01 and abs(e.var().item() - 1.0) < 0.03
    for t in (1e-3, 1e-2, 0.5, 2.0):  # P(E < t) = 1 - exp(-t)
        frac = (e < t).double().mean().item()
        want = 1 - math.exp(-t)
        assert abs(frac - want) < 5 * math.sqrt(want * (1 - want) / e.numel()) + 1e-6, t
    small = e[e < 1e-3]
    assert small.unique().numel() == small.numel()  # not quantised near 0 (the 2^-24 grid would collide)


def test_frequencies_follow_the_nucleus():
    p = torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]])
    n = 120
    out, _ = _run(p, rows=torch.zeros(n, dtype=torch.int32), top_p=torch.full((n,), 0.75), seed=3)
    counts = torch.bincount(out.long(), minlength=6).double()
    want = torch.tensor([0.4, 0.25, 0.15, 0, 0, 0], dtype=torch.float64) / 0.8  # mass(p > 0.15) = 0.65 < 0.75
    assert counts[3:].sum() == 0
    cos = torch.nn.functional.cosine_similarity(counts / n, want, dim=0)
    chi2 = (((counts[:3] - n * want[:3]) ** 2) / (n * want[:3])).sum()
    assert cos > 0.99 and chi2 < 16.0  # df = 2: P(chi2 > 16) ~ 3e-4

"""The split-row sampler (`pagoda.kernels.sampling.split`): under the Triton interpreter (CPU, fp32/fp16) exact
plain and min-p draws, the rejection fallback of min-p, degenerate rows, tickets left at zero; on a GPU the
same laws at a 151,936-token vocabulary in bf16/fp32 and a captured graph replaying the eager call."""
import math
import os

import pytest
import torch
import triton
import triton.language as tl

from pagoda.kernels.sampling import split as S

interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                            reason="interpreter tests run only where TRITON_INTERPRET=1 (no CUDA)")


T = 256     # tokens per slice step in the interpreter tests (the GPU tests use the default, S.SLICE)


def _run(x, n_out=None, min_p=None, seed=5, offset=0, slices=3, slice_tokens=T, frontier=False):
    n = x.shape[0] if n_out is None else n_out
    rows = None if n_out is None else torch.zeros(n, dtype=torch.int32, device=x.device)
    out = torch.full((n,), -7, dtype=torch.int32, device=x.device)
    valid = torch.zeros(n, dtype=torch.bool, device=x.device)
    S.split_sample(x, out, valid, rows, min_p, seed, offset, slices, slice_tokens, frontier)
    return out.cpu(), valid.cpu()


def _chi2_ok(counts: torch.Tensor, want: torch.Tensor, n: int) -> bool:
    keep = want > 0
    chi2 = (((counts[keep] - n * want[keep]) ** 2) / (n * want[keep])).sum().item()
    df = int(keep.sum()) - 1
    return chi2 < df + 6 * math.sqrt(2 * df) + 6      # ~1e-4 false alarm for these df


def _row(vocab: int, hot: dict) -> torch.Tensor:
    """A row whose mass sits on a few tokens spread over the slices (the rest tiny but positive)."""
    p = torch.full((1, vocab), 1e-7)
    for t, w in hot.items():
        p[0, t] = w
    return p / p.sum()


@interp
def test_plain_draws_follow_the_row_across_slices():
    vocab = 3 * T + 100                          # 4 whole-step slices, the last one short
    p = _row(vocab, {5: 0.4, T + 7: 0.3, 2 * T + 9: 0.2, 3 * T + 50: 0.1})
    n = 200
    out, valid = _run(p, n_out=n, slices=4)
    assert valid.all() and ((out >= 0) & (out < vocab)).all()
    hot = [5, T + 7, 2 * T + 9, 3 * T + 50]
    counts = torch.tensor([(out == t).sum().item() for t in hot], dtype=torch.float64)
    assert counts.sum() >= n - 2                       # the 1e-7 tail has ~4e-4 of the mass
    assert _chi2_ok(counts, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), int(counts.sum()))


@interp
def test_min_p_keeps_to_the_set_and_renormalises_with_fallback():
    # N = {p >= 0.5 * max} = the two leading tokens, p(N) = 0.35: ~65% of the first draws are rejected and
    # redrawn from N by the last program (the fallback race).
    vocab = 2 * T
    p = torch.full((1, vocab), 0.65 / (vocab - 2))
    p[0, 3], p[0, T + 1] = 0.2, 0.15
    n = 200
    out, valid = _run(p, n_out=n, min_p=0.5, slices=2)
    assert valid.all()
    assert set(out.tolist()) <= {3, T + 1}
    counts = torch.tensor([(out == 3).sum().item(), (out == T + 1).sum().item()], dtype=torch.float64)
    assert _chi2_ok(counts, torch.tensor([0.2, 0.15], dtype=torch.float64) / 0.35, n)
    # a per-row tensor of min_p, and min_p = 0 (every positive token) / 1 (the maximum only)
    q = torch.cat([p, p])
    out, valid = _run(q, min_p=torch.tensor([1.0, 0.0]), slices=2)
    assert valid.all() and out[0].item() == 3 and 0 <= out[1].item() < vocab


def _min_p_row(vocab):
    """Mass on four tokens of two slices, p(N) = 0.35 for min_p = 0.5 (N = the two leading tokens), the rest
    spread thinly: most plain race winners fall outside N."""
    p = torch.full((1, vocab), 0.65 / (vocab - 4))
    p[0, 3], p[0, T + 1], p[0, 7], p[0, T + 9] = 0.2, 0.15, 0.06, 0.05
    return p / p.sum()


@interp
def test_min_p_frontier_is_exact_and_reuses_the_plain_race():
    """Frontier min-p: the law of p restricted to N; where the plain race's winner lies in N, the very same
    token (same keys: the frontier only restricts the race)."""
    vocab = 2 * T
    p = _min_p_row(vocab)
    n = 120
    out, valid = _run(p, n_out=n, min_p=0.5, slices=2, frontier=True)
    assert valid.all() and set(out.tolist()) <= {3, T + 1}
    counts = torch.tensor([(out == 3).sum().item(), (out == T + 1).sum().item()], dtype=torch.float64)
    assert _chi2_ok(counts, torch.tensor([0.2, 0.15], dtype=torch.float64) / 0.35, n)
    plain, _ = _run(p, n_out=n, slices=2)
    inside = (plain == 3) | (plain == T + 1)
    assert inside.sum() >= 20 and torch.equal(out[inside], plain[inside])


@triton.jit
def _marker_draw(lane_w, lanes, base, a_bits, seed, rng_base, stage, vocab, LANES: tl.constexpr, NCP: tl.constexpr):
    """Stands in for the exact redraw: always token T + 2 (in N), so a test sees when the redraw ran."""
    return tl.full((), T + 2, tl.int32)


@interp
@pytest.mark.parametrize("k", [8, 1])
def test_min_p_frontier_redraws_only_when_a_slice_frontier_overflows(monkeypatch, k):
    """Slice 0 holds 64 near-equal tokens, all under the row's threshold (N = {T+1, T+2} in slice 1): its
    frontier is ~5 entries long. With K = 8 it fits (the redraw is rare); with K = 1 it overflows on every
    row and the redraw (here a marker) decides. The real redraw's law is checked with K = 1 as well."""
    vocab = 2 * T
    p = torch.full((1, vocab), 1e-6)
    p[0, 10:74] = 0.01 * (1 + torch.arange(64) / 640)
    p[0, T + 1], p[0, T + 2] = 0.3, 0.2
    p = p / p.sum()
    n = 80
    monkeypatch.setattr(S, "FRONTIER_K", k)
    out, valid = _run(p, n_out=n, min_p=0.5, slices=2, frontier=True)
    assert valid.all() and set(out.tolist()) <= {T + 1, T + 2}
    counts = torch.tensor([(out == T + 1).sum().item(), (out == T + 2).sum().item()], dtype=torch.float64)
    assert _chi2_ok(counts, torch.tensor([0.6, 0.4], dtype=torch.float64), n)
    monkeypatch.setattr(S, "_lane_draw", _marker_draw)
    marked, _ = _run(p, n_out=n, min_p=0.5, slices=2, frontier=True)
    redrawn = int((marked == T + 2).sum()) - int(((marked == T + 2) & (out == T + 2)).sum())
    if k == 1:
        assert (marked == T + 2).all()
    else:
        assert (marked == T + 1).sum() >= 30 and redrawn <= n // 10


@interp
def test_min_p_frontier_per_row_thresholds_and_degenerate_rows():
    vocab = 2 * T
    p = _min_p_row(vocab)
    x = torch.cat([p, p, torch.zeros(1, vocab), torch.full((1, vocab), float("nan"))])
    out, valid = _run(x, min_p=torch.tensor([1.0, 0.0, 0.5, 0.5]), slices=2, frontier=True)
    assert out[0].item() == 3 and 0 <= out[1].item() < vocab and out[2:].tolist() == [0, 0]
    assert valid.tolist() == [True, True, False, False]
    one_step = _run(p, min_p=0.5, slices=1, frontier=True)       # one slice of 2 steps: accept-or-redraw
    assert one_step[0].item() in (3, T + 1) and one_step[1].all()


@interp
def test_rows_draw_independent_numbers():
    """Two output rows with their mass tied on the tail of row 0 and the head of row 1, where a row stride of
    ceil(vocab / 4) counters made them share numbers. vocab = T + 100 = 356, 64-token sub-blocks: row 0's
    tokens 350, 351 (last step, sub-block 1, q = 30, 31) take word 1 of counters 64 + 30, 64 + 31 = 94, 95;
    with a stride of ceil(356 / 4) = 89 those are row 1's counters 5, 6, whose word 1 feeds its tokens 69, 70."""
    vocab = T + 100
    x = torch.zeros(2, vocab)
    x[0, 350], x[0, 351] = 0.5, 0.5
    x[1, 69], x[1, 70] = 0.5, 0.5
    same = 0
    for seed in range(30):
        out, valid = _run(x, seed=seed, slices=2)
        assert valid.all()
        same += int((out[0] - 350) == (out[1] - 69))
    assert 5 <= same <= 25, same


@interp
def test_degenerate_rows_and_fp16():
    vocab = T + 5
    x = torch.zeros(3, vocab)
    x[1] = float("nan")
    x[2, vocab - 1] = 1.0                              # all the mass on the last token of the last slice
    out, valid = _run(x, slices=2)
    assert out.tolist()[:2] == [0, 0] and valid.tolist() == [False, False, True] and out[2].item() == vocab - 1
    out, valid = _run(x.half(), min_p=0.3, slices=2)
    assert valid.tolist() == [False, False, True] and out[2].item() == vocab - 1


@interp
def test_same_seed_same_tokens_and_tickets_back_to_zero():
    p = torch.softmax(torch.randn(4, 2 * T) * 2, -1)
    a, _ = _run(p, seed=9, offset=8)
    b, _ = _run(p, seed=9, offset=8)
    c, _ = _run(p, seed=9, offset=8 + 4 * 2 * T)
    d, _ = _run(p, seed=torch.tensor([9]), offset=torch.tensor([8]))
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)
    assert (S._workspaces[p.device][3] == 0).all()


def test_slice_count_policy():
    assert S.num_slices(151936, 1, 132) == math.ceil(151936 / S.MIN_SLICE)
    assert S.num_slices(151936, 8, 132) == 16 and S.num_slices(32000, 1, 132) == 8
    assert S.num_slices(1000, 1, 132) == 1 and S.num_slices(10 ** 7, 1, 132) == S.MAX_SLICES


_AOT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pagoda.kernels.sampling import split as S
ptr = {"x_ptr": "*bf16", "rows_ptr": "*i32", "out_ptr": "*i32", "valid_ptr": "*i8", "min_p_ptr": "*fp32",
       "min_p_val": "fp32", "part_key_ptr": "*fp32", "part_idx_ptr": "*i32", "part_max_ptr": "*fp32",
       "ticket_ptr": "*i32", "fr_p_ptr": "*fp32", "fr_key_ptr": "*fp32", "fr_tok_ptr": "*i32", "fr_cnt_ptr": "*i32",
       "seed_ptr": "*i64", "offset_ptr": "*i64"}
for min_p, rows, seed_ptr in ((False, False, False), (True, True, True)):
    consts = {"SCALAR_PARAMS": not rows, "HAS_ROWS": rows, "HAS_MIN_P": min_p, "SEED_PTR": seed_ptr,
              "SLICES_PAD": S.MAX_SLICES, "SLICE": S.SLICE, "LANES": S.FALLBACK_LANES, "NCP": 128,
              "FRONTIER": min_p, "K": S.FRONTIER_K}
    fn = S._split_sample_kernel
    sig = {n: ptr.get(n, "i32") for n in fn.arg_names if n not in consts}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": S.NUM_WARPS})
    assert "atom" in k.asm["ptx"] and "ld.global.cg" in k.asm["ptx"], "ticket atomics / L2 reads of the partials"
print("COMPILED")
"""


def test_split_kernel_compiles_for_sm90():
    """Type checks the interpreter skips, on an H100/H200 target (Triton's bundled ptxas, no GPU needed)."""
    from tests.helpers import run_aot_script

    run_aot_script(_AOT)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("min_p, frontier", [(None, False), (0.6, False), (0.6, True)])
def test_gpu_split_draws_follow_the_law_and_replay_in_a_graph(dtype, min_p, frontier):
    vocab, hot = 151936, [5, 40000, 90001, 151935]
    p = torch.full((1, vocab), 1e-7)
    p[0, hot] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    x = p.to("cuda", dtype)
    pf = x.float().cpu()[0].double()
    keep = pf >= (min_p or 0.0) * pf.max()
    want = torch.where(keep, pf, 0.0) / torch.where(keep, pf, 0.0).sum()
    n = 4000
    out, valid = _run(x, n_out=n, min_p=min_p, slices=S.num_slices(vocab, 1, 132), slice_tokens=S.SLICE,
                      frontier=frontier)
    assert valid.all() and ((out >= 0) & (out < vocab)).all()
    assert keep[out.long()].all()                       # min-p: only tokens of N (the fallback redraws)
    outside = (~torch.isin(out, torch.tensor(hot))).sum().item()
    buckets = torch.tensor([(out == t).sum().item() for t in hot] + [outside], dtype=torch.float64)
    law = torch.cat([want[hot], (1 - want[hot].sum()).clamp(min=0).reshape(1)])
    assert _chi2_ok(buckets, law, n)
    # captured once, replayed: the eager call's tokens for the same device seed/offset; tickets left at zero
    seed, off = torch.tensor([3], device="cuda"), torch.tensor([12], device="cuda")
    o1, v1 = torch.empty(8, dtype=torch.int32, device="cuda"), torch.empty(8, dtype=torch.bool, device="cuda")
    rows = torch.zeros(8, dtype=torch.int32, device="cuda")
    S.split_sample(x, o1, v1, rows, min_p, seed, off, 38, frontier=frontier)
    o2, v2 = torch.empty_like(o1), torch.empty_like(v1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        S.split_sample(x, o2, v2, rows, min_p, seed, off, 38, frontier=frontier)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        S.split_sample(x, o2, v2, rows, min_p, seed, off, 38, frontier=frontier)
    o2.fill_(-1)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(o1, o2) and torch.equal(v1, v2)
    assert (S._workspaces[x.device][3] == 0).all()


@pytest.mark.gpu
def test_gpu_ops_take_the_split_path_unless_disabled_or_too_many_rows(monkeypatch):
    from pagoda.ops import sampling as ops

    calls, frontiers = [], []
    real = S.split_sample

    def spy(*a, **k):
        calls.append(a[-1])
        frontiers.append(k["frontier"])
        return real(*a, **k)

    monkeypatch.setattr(S, "split_sample", spy)
    probs = torch.softmax(torch.randn(2, 151936, device="cuda") * 3, -1)
    monkeypatch.setenv("PAGODA_SAMPLING_SPLIT", "0")
    ops.sampling_from_probs(probs)
    assert calls == []
    monkeypatch.delenv("PAGODA_SAMPLING_SPLIT")          # the default
    tok = ops.sampling_from_probs(probs)
    tok2 = ops.min_p_sampling_from_probs(probs, 0.1)
    assert len(calls) == 2 and calls[0] >= ops.FRONTIER_MIN_SLICES
    assert frontiers[1]                                  # min-p over >= 16 slices: one-pass frontiers
    ops.min_p_sampling_from_probs(probs[:, :32000].contiguous(), 0.1)
    assert calls[2] < ops.FRONTIER_MIN_SLICES and frontiers[2] is False   # 8 slices: accept-or-redraw
    del calls[2:], frontiers[2:]
    assert ((tok >= 0) & (tok < 151936)).all() and ((tok2 >= 0) & (tok2 < 151936)).all()
    ops.top_p_sampling_from_probs(probs, 0.9)            # top-p / top-k keep the one-program kernel
    assert len(calls) == 2
    ops.sampling_from_probs(torch.softmax(torch.randn(ops.MAX_SPLIT_BATCH + 1, 151936, device="cuda"), -1))
    assert len(calls) == 2                               # too many rows: one program per row

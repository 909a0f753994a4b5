"""Split-row sampler for small batches: plain and min-p sampling with each row read by several programs.

Why: `pagoda.kernels.sampling.row` streams a row on one program, i.e. one SM. At batch 1 an SM's load path
reads ~28 GB/s on the H200 whatever the prefetch depth (24.9 µs for a 151,936-token row, where torch.amax spreads the
same row over many SMs in 10.7 µs). Here a
row is cut into ``S`` slices of whole ``SLICE``-token steps, one program per (output row, slice):

    slice program   exponential race over its tokens: key ``-E_t / p_t`` (larger wins), E_t ~ Exp(1) from
                    Philox (`_philox_chunk` layout, stage 0; rows `_chunk_row_quads(vocab, SLICE)` counters
                    apart), over ``{p > 0}``. A step's four sub-block loads are issued before its Philox
                    math, so a slice of one step costs one DRAM round trip (1024-token steps, one round
                    trip each, took 16 µs for a 151,936-token row against 25 for one program on an H200). Writes its
                    best (key, token) and its largest p, then
                    takes a ticket (atomic add, acq_rel, gpu scope).
    last program    (the one whose ticket is S - 1) reads the S partials from L2 (.cg), zeroes the ticket
                    for the following call (graph replays start clean), and picks the best key: an exact draw
                    from p (the winner of an exponential race over all tokens). min-p: with M the largest
                    p, the row keeps ``N = {p >= min(min_p * M, M)}``; a winner inside N is accepted; else
                    the last program draws again from p restricted to N, exactly and with fresh numbers,
                    by the one-program sampler's two-level draw (one streaming pass for per-lane masses of
                    N, a race over the lanes, a race within the chosen lane: stages 1 and 2 of the
                    `_exp_at` layout, whose counters stay below the row's ``ceil(vocab / 4)``). Exact: a draw
                    from p kept when it falls in N, else a fresh draw from p restricted to N, is a draw from
                    p restricted to N (P(t) = p_t + (1 - p(N)) p_t / p(N) = p_t / p(N) for t in N,
                    normalised p). softmax(3 N(0,1)) rows with min_p = 0.05 keep ~97% of their mass in N.

Race frontiers (min-p on slices of one step; the ops layer takes them on rows of >= 16 slices, where they beat
accept-or-redraw): a slice records, for its own keys, the best-key token of every threshold (`_frontier_slice`,
~2-3 entries). min-p then needs no redraw: the draw is the largest key among all entries with p >= the row's
threshold.

Rows with no positive, finite-comparable mass give token 0 and valid = False. Every token is in
``[0, vocab)``. The partials and tickets are a per-device workspace shared by all calls: calls are assumed
to run on one stream (as the decode kernel's merge tickets). No host synchronisation: graph-capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.launch.fast import cdiv, launch, next_pow2
from pagoda.kernels.sampling.race import (
    _chunk_row_quads,
    _exp1,
    _in_set,
    _philox_state,
    _race_fold,
    _race_key,
    _race_winner,
    _row_param,
    _source_row,
)
from pagoda.kernels.sampling.row import _lane_draw, _track_pass

SLICE = 4096          # tokens per step of a slice program (8 warps: 16 tokens a thread, 4 Philox words each)
MIN_SLICE = SLICE     # tokens per slice at least: below that a program's fixed cost outweighs its share
MAX_SLICES = 64       # partials per row in the workspace
FALLBACK_LANES = 2048  # lanes of the last program's min-p redraw (8 warps, 4 chunks in flight)
NUM_WARPS = 8
FRONTIER_K = 8        # frontier entries a slice keeps for min-p (`_frontier_slice`)


@triton.jit
def _race_slice(base, seed, rng_base, lo, hi, SLICE: tl.constexpr):
    """Exponential race over tokens ``[lo, hi)`` of a row, ``{p > 0}``: (best key, its token or -1, largest
    eligible p). ``lo`` is a multiple of SLICE; token ``start + j*Q + q`` of a step takes word j of Philox
    counter ``rng_base + start // 4 + q`` (stage 0: exactly `_philox_chunk`)."""
    Q: tl.constexpr = SLICE // 4
    offs = tl.arange(0, Q)
    key_v = tl.full((Q,), float("-inf"), tl.float32)
    idx_v = tl.full((Q,), -1, tl.int32)
    mx = tl.zeros((Q,), tl.float32)
    zero = (offs * 0).to(tl.uint32)
    for start in range(lo, hi, SLICE):
        c0 = start + offs
        x0 = tl.load(base + c0, mask=c0 < hi, other=0.0)
        x1 = tl.load(base + (c0 + Q), mask=c0 + Q < hi, other=0.0)
        x2 = tl.load(base + (c0 + 2 * Q), mask=c0 + 2 * Q < hi, other=0.0)
        x3 = tl.load(base + (c0 + 3 * Q), mask=c0 + 3 * Q < hi, other=0.0)
        c = rng_base + start // 4 + offs
        r0, r1, r2, r3 = tl.philox(seed, c.to(tl.uint32), (c >> 32).to(tl.uint32), zero, zero)
        for j in tl.static_range(4):
            x = (x0 if j == 0 else x1 if j == 1 else x2 if j == 2 else x3).to(tl.float32)
            r = r0 if j == 0 else r1 if j == 1 else r2 if j == 2 else r3
            cols = c0 + j * Q
            elig = (cols < hi) & _in_set(x, 1)
            key_v, idx_v = _race_fold(_race_key(x, _exp1(r), False), elig, cols, key_v, idx_v)
            mx = tl.maximum(mx, tl.where(elig, x, 0.0))
    best = tl.max(key_v, 0)
    return best, _race_winner(key_v, idx_v), tl.max(mx, 0)


@triton.jit
def _frontier_slice(base, seed, rng_base, lo, hi, min_p, fr_p_ptr, fr_key_ptr, fr_tok_ptr, fslot,
                    K: tl.constexpr, SLICE: tl.constexpr):
    """min-p on a one-step slice ``[lo, hi)`` (``hi - lo <= SLICE``), exactly, without knowing the row's max.

    With the same race keys as `_race_slice` (stage 0) and ``E_0 = {p >= min(min_p * m_s, m_s)}`` (m_s the
    slice's largest p; the row's threshold is at least that), the frontier is ``w_1 = argmax key over E_0``,
    ``E_i = {p > p_(w_i)} ∩ E_(i-1)``, ``w_(i+1) = argmax key over E_i``, ... until E is empty. For any
    threshold t >= the slice's own (min_p = 0: every t), the best key over ``{p >= t}`` is the first frontier
    entry with p >= t (by induction: while p_(w_i) < t, E_i still holds all of {p >= t}); entries have increasing p and
    decreasing keys, so it is also the largest key among the entries with p >= t. Writes at most K entries
    (p, key, token) at ``fslot * K``; returns (entry count, K + 1 when E was not empty after K entries; the
    slice's largest p). Simulated for min-p 0.05 on softmax(3 N(0,1)) rows: 2.2 entries on
    average, at most 9, and the entry that decides a row's draw within the first 6, in 4,600 slices."""
    Q: tl.constexpr = SLICE // 4
    offs = tl.arange(0, Q)
    zero = (offs * 0).to(tl.uint32)
    c0 = lo + offs
    c1 = c0 + Q
    c2 = c0 + 2 * Q
    c3 = c0 + 3 * Q
    x0 = tl.load(base + c0, mask=c0 < hi, other=0.0).to(tl.float32)
    x1 = tl.load(base + c1, mask=c1 < hi, other=0.0).to(tl.float32)
    x2 = tl.load(base + c2, mask=c2 < hi, other=0.0).to(tl.float32)
    x3 = tl.load(base + c3, mask=c3 < hi, other=0.0).to(tl.float32)
    c = rng_base + lo // 4 + offs
    r0, r1, r2, r3 = tl.philox(seed, c.to(tl.uint32), (c >> 32).to(tl.uint32), zero, zero)
    e0 = (c0 < hi) & _in_set(x0, 1)
    e1 = (c1 < hi) & _in_set(x1, 1)
    e2 = (c2 < hi) & _in_set(x2, 1)
    e3 = (c3 < hi) & _in_set(x3, 1)
    m = tl.max(tl.maximum(tl.maximum(tl.where(e0, x0, 0.0), tl.where(e1, x1, 0.0)),
                          tl.maximum(tl.where(e2, x2, 0.0), tl.where(e3, x3, 0.0))), 0)
    tb = tl.maximum(tl.minimum(min_p * m, m).to(tl.int32, bitcast=True), 1)
    k0 = tl.where(e0 & _in_set(x0, tb), _race_key(x0, _exp1(r0), False), float("-inf"))
    k1 = tl.where(e1 & _in_set(x1, tb), _race_key(x1, _exp1(r1), False), float("-inf"))
    k2 = tl.where(e2 & _in_set(x2, tb), _race_key(x2, _exp1(r2), False), float("-inf"))
    k3 = tl.where(e3 & _in_set(x3, tb), _race_key(x3, _exp1(r3), False), float("-inf"))
    best = tl.max(tl.maximum(tl.maximum(k0, k1), tl.maximum(k2, k3)), 0)
    cnt = tl.zeros((), tl.int32)
    for i in range(K):
        if best > float("-inf"):
            big = 2147483647
            w = tl.min(tl.minimum(tl.minimum(tl.where(k0 == best, c0, big), tl.where(k1 == best, c1, big)),
                                  tl.minimum(tl.where(k2 == best, c2, big), tl.where(k3 == best, c3, big))), 0)
            pw = tl.max(tl.maximum(tl.maximum(tl.where(c0 == w, x0, 0.0), tl.where(c1 == w, x1, 0.0)),
                                   tl.maximum(tl.where(c2 == w, x2, 0.0), tl.where(c3 == w, x3, 0.0))), 0)
            tl.store(fr_p_ptr + fslot * K + i, pw)
            tl.store(fr_key_ptr + fslot * K + i, best)
            tl.store(fr_tok_ptr + fslot * K + i, w)
            cnt = i + 1
            k0 = tl.where(x0 > pw, k0, float("-inf"))
            k1 = tl.where(x1 > pw, k1, float("-inf"))
            k2 = tl.where(x2 > pw, k2, float("-inf"))
            k3 = tl.where(x3 > pw, k3, float("-inf"))
            best = tl.max(tl.maximum(tl.maximum(k0, k1), tl.maximum(k2, k3)), 0)
    return tl.where(best > float("-inf"), K + 1, cnt), m


@triton.jit
def _load_frontiers(fr_p_ptr, fr_key_ptr, fr_tok_ptr, fr_cnt_ptr, pid, num_slices, SLICES_PAD: tl.constexpr,
                    K: tl.constexpr):
    """Row ``pid``'s frontier entries from L2: counts ``[SLICES_PAD, 1]`` (K + 1: overflowed), the mask of
    present entries and their p, keys (-inf where absent) and tokens, each ``[SLICES_PAD, K]``."""
    s2 = tl.arange(0, SLICES_PAD)[:, None]
    i2 = tl.arange(0, K)[None, :]
    counts = tl.load(fr_cnt_ptr + pid * SLICES_PAD + s2, mask=s2 < num_slices, other=0, cache_modifier=".cg")
    have = (s2 < num_slices) & (i2 < tl.minimum(counts, K))
    at = (pid * SLICES_PAD + s2) * K + i2
    ps = tl.load(fr_p_ptr + at, mask=have, other=0.0, cache_modifier=".cg")
    ks = tl.load(fr_key_ptr + at, mask=have, other=float("-inf"), cache_modifier=".cg")
    ts = tl.load(fr_tok_ptr + at, mask=have, other=2147483647, cache_modifier=".cg")
    return counts, have, ps, ks, ts


@triton.jit
def _min_p_bits(min_p_ptr, min_p_val, pid, m, SCALAR_PARAMS: tl.constexpr):
    """Bits of min-p's threshold ``min(min_p * m, m)`` for the row's largest p ``m`` (at least 1: p > 0)."""
    thr = tl.minimum(_row_param(min_p_ptr, min_p_val, pid, SCALAR_PARAMS, tl.float32) * m, m)
    return tl.maximum(thr.to(tl.int32, bitcast=True), 1)


@triton.jit
def _redraw(base, a_bits, seed, rng_base, vocab, LANES: tl.constexpr, NCP: tl.constexpr):
    """An exact draw from p restricted to ``{p >= a}`` on this program, with fresh numbers (stages 1-2 of the
    `_exp_at` layout): one pass for the set's per-lane masses, then the one-program sampler's two races."""
    lanes = tl.arange(0, LANES)
    mass, _v1, _v2, _v3 = _track_pass(base, a_bits, vocab, lanes, LANES, False)
    return _lane_draw(mass, lanes, base, a_bits, seed, rng_base, 1, vocab, LANES, NCP)


# Arguments that change with the batch or the step (see `row._sample_kernel`; the slice count follows the batch
# size): one compiled kernel serves every value.
@triton.jit(do_not_specialize=["num_rows", "num_slices", "seed_stride", "offset_stride", "seed_lo", "seed_hi",
                               "offset_lo", "offset_hi"])
def _split_sample_kernel(x_ptr, stride_x, rows_ptr, out_ptr, valid_ptr, min_p_ptr, min_p_val,
                         part_key_ptr, part_idx_ptr, part_max_ptr, ticket_ptr,
                         fr_p_ptr, fr_key_ptr, fr_tok_ptr, fr_cnt_ptr,
                         seed_ptr, seed_stride, offset_ptr, offset_stride, seed_lo, seed_hi, offset_lo, offset_hi,
                         vocab, num_rows, slice_len, num_slices,
                         SCALAR_PARAMS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_MIN_P: tl.constexpr,
                         SEED_PTR: tl.constexpr, SLICES_PAD: tl.constexpr, SLICE: tl.constexpr,
                         LANES: tl.constexpr, NCP: tl.constexpr, FRONTIER: tl.constexpr, K: tl.constexpr):
    """Grid ``(batch, num_slices)``; workspace ``part_* [batch, SLICES_PAD]``, ``ticket [batch]`` (zeros),
    ``fr_* [batch, SLICES_PAD, K]`` / ``fr_cnt [batch, SLICES_PAD]`` (FRONTIER). LANES / NCP: the min-p
    redraw's lanes and ``next_pow2(ceil(vocab / LANES))``. FRONTIER (with HAS_MIN_P, one step per slice):
    min-p from each slice's race frontier (`_frontier_slice`) instead of accept-or-redraw; the redraw then
    runs only when a slice's frontier outgrew K entries before reaching the row's threshold."""
    pid = tl.program_id(0)
    sl = tl.program_id(1)
    row = _source_row(rows_ptr, pid, num_rows, HAS_ROWS)
    base = x_ptr + row * stride_x
    seed, off = _philox_state(pid, seed_ptr, seed_stride, offset_ptr, offset_stride, seed_lo, seed_hi, offset_lo,
                              offset_hi, SEED_PTR)
    rng_base = off + pid.to(tl.int64) * _chunk_row_quads(vocab, SLICE)
    lo = sl * slice_len
    hi = tl.minimum(lo + slice_len, vocab)
    slot = pid * SLICES_PAD + sl
    if FRONTIER:
        mp = _row_param(min_p_ptr, min_p_val, pid, SCALAR_PARAMS, tl.float32)
        cnt, pmax = _frontier_slice(base, seed, rng_base, lo, hi, mp, fr_p_ptr, fr_key_ptr, fr_tok_ptr, slot, K, SLICE)
        tl.store(fr_cnt_ptr + slot, cnt)
    else:
        key, tok, pmax = _race_slice(base, seed, rng_base, lo, hi, SLICE)
        tl.store(part_key_ptr + slot, key)
        tl.store(part_idx_ptr + slot, tok)
    tl.store(part_max_ptr + slot, pmax)
    tl.debug_barrier()   # every thread's stores before the ticket (release covers them from here)
    ticket = tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel", scope="gpu")
    if ticket == num_slices - 1:
        tl.atomic_xchg(ticket_ptr + pid, 0, sem="relaxed", scope="gpu")   # zero again for the following call
        s = tl.arange(0, SLICES_PAD)
        live = s < num_slices
        maxes = tl.load(part_max_ptr + pid * SLICES_PAD + s, mask=live, other=0.0, cache_modifier=".cg")
        if FRONTIER:
            m = tl.max(maxes, 0)
            thr_bits = _min_p_bits(min_p_ptr, min_p_val, pid, m, SCALAR_PARAMS)
            counts, have, ps, ks, ts = _load_frontiers(fr_p_ptr, fr_key_ptr, fr_tok_ptr, fr_cnt_ptr, pid, num_slices,
                                                       SLICES_PAD, K)
            ok = have & _in_set(ps, thr_bits)
            # Each slice's answer is its largest key among entries with p >= thr; the row's, the largest of those.
            best = tl.max(tl.max(tl.where(ok, ks, float("-inf")), 1), 0)
            tok = tl.min(tl.min(tl.where(ok & (ks == best), ts, 2147483647), 1), 0)
            cand = tl.where(tok == 2147483647, -1, tok)
            # A slice whose frontier outgrew K before reaching thr hides its answer: redraw exactly.
            lost = tl.max(tl.max(((counts > K) & (tl.max(ok.to(tl.int32), 1)[:, None] == 0)).to(tl.int32), 1), 0)
            found = m > 0.0
            accepted = cand >= 0
            if found & (lost > 0):
                cand = _redraw(base, thr_bits, seed, rng_base, vocab, LANES, NCP)
                accepted = cand >= 0
            found = found & (cand >= 0)
        else:
            keys = tl.load(part_key_ptr + pid * SLICES_PAD + s, mask=live, other=float("-inf"), cache_modifier=".cg")
            toks = tl.load(part_idx_ptr + pid * SLICES_PAD + s, mask=live, other=-1, cache_modifier=".cg")
            cand = _race_winner(keys, toks)   # slices hold disjoint tokens: ties broken by the lower token
            found = cand >= 0
            accepted = found
        if HAS_MIN_P and not FRONTIER:
            thr_bits = _min_p_bits(min_p_ptr, min_p_val, pid, tl.max(maxes, 0), SCALAR_PARAMS)
            p_c = tl.load(base + tl.maximum(cand, 0)).to(tl.float32)
            if found & ~_in_set(p_c, thr_bits):
                # Rejected (probability 1 - p(N)): a fresh exact draw from p restricted to N, on this program.
                again = _redraw(base, thr_bits, seed, rng_base, vocab, LANES, NCP)
                cand = tl.where(again >= 0, again, cand)
                accepted = again >= 0   # N holds the largest p: never empty when the row has mass
        tl.store(out_ptr + pid, tl.where(found, cand, 0).to(out_ptr.dtype.element_ty))
        tl.store(valid_ptr + pid, accepted.to(tl.int8))


# device -> (part_key, part_idx, part_max, ticket, fr_p, fr_key, fr_tok, fr_cnt): grown (replaced) when a larger
# batch comes, never cleared (captured graphs point into it).
_workspaces: dict = {}
_retired: list = []      # outgrown workspaces: a captured graph may still launch with them, so never freed


def ready(device: torch.device, batch: int) -> bool:
    """Whether a workspace for ``batch`` rows exists on ``device``. Under CUDA-graph capture one must: made
    there, its zeroed tickets would be a graph node that only a replay runs (the ops layer then keeps the
    one-program kernel)."""
    ws = _workspaces.get(device)
    return ws is not None and ws[3].shape[0] >= batch


def _workspace(device: torch.device, batch: int):
    ws = _workspaces.get(device)
    if ws is None or ws[3].shape[0] < batch:
        if ws is not None:
            _retired.append(ws)
        rows = max(batch, 64)
        ws = _workspaces[device] = (
            torch.empty(rows * MAX_SLICES, dtype=torch.float32, device=device),
            torch.empty(rows * MAX_SLICES, dtype=torch.int32, device=device),
            torch.empty(rows * MAX_SLICES, dtype=torch.float32, device=device),
            torch.zeros(rows, dtype=torch.int32, device=device),
            torch.empty(rows * MAX_SLICES * FRONTIER_K, dtype=torch.float32, device=device),
            torch.empty(rows * MAX_SLICES * FRONTIER_K, dtype=torch.float32, device=device),
            torch.empty(rows * MAX_SLICES * FRONTIER_K, dtype=torch.int32, device=device),
            torch.empty(rows * MAX_SLICES, dtype=torch.int32, device=device))
    return ws


def num_slices(vocab: int, batch: int, sms: int) -> int:
    """Slices per row: enough programs to cover the SMs, each at least MIN_SLICE tokens, at most MAX_SLICES."""
    return max(1, min(MAX_SLICES, sms // max(batch, 1), cdiv(vocab, MIN_SLICE)))


def split_sample(x: torch.Tensor, out: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor | None,
                 min_p, seed, offset, slices: int, slice_tokens: int = SLICE, frontier: bool = False) -> None:
    """Plain (``min_p`` None) or min-p sampling with ``slices`` programs per output row.

    x ``[num_rows, vocab]`` probabilities (last dim contiguous); out ``[batch]`` int32/int64; valid
    ``[batch]`` bool; rows optional int ``[batch]``; min_p a float, a float32 ``[batch]`` tensor or None;
    seed/offset ints or int64 device tensors of length 1 or batch (as `sampling.sample`). ``slice_tokens``:
    tokens per step of a slice program (a power of two >= 64; tests use small ones). ``frontier``: min-p from
    each slice's race frontier (exact, one pass; see `_frontier_slice`) where every slice is one step, else
    accept-or-redraw. Inside a CUDA-graph capture the workspace must already exist (`ready`): call once outside
    the capture first."""
    from pagoda.kernels.sampling.row import _seed_args

    batch, vocab = out.shape[0], x.shape[1]
    if batch == 0:
        return
    slice_len = cdiv(cdiv(vocab, max(1, min(slices, MAX_SLICES))), slice_tokens) * slice_tokens
    n = cdiv(vocab, slice_len)
    if x.is_cuda and torch.cuda.is_current_stream_capturing() and not ready(x.device, batch):
        raise RuntimeError("split_sample: its workspace is made outside CUDA-graph capture (run one call first)")
    ws = _workspace(x.device, batch)
    use_frontier = frontier and min_p is not None and slice_len == slice_tokens
    scalar = not isinstance(min_p, torch.Tensor)
    # <= slice_tokens: the redraw's lane counters (LANES / 4) stay inside the row's chunk counters.
    lanes = max(16, min(FALLBACK_LANES, slice_tokens, next_pow2(vocab)))
    launch(
        _split_sample_kernel, (batch, n),
        x, x.stride(0), rows if rows is not None else out, out, valid.view(torch.int8),
        min_p if isinstance(min_p, torch.Tensor) else out, float(min_p) if scalar and min_p is not None else 0.0,
        *ws, *_seed_args(seed, offset, out)[:-1], vocab, x.shape[0], slice_len, n,
        SCALAR_PARAMS=scalar, HAS_ROWS=rows is not None, HAS_MIN_P=min_p is not None,
        SEED_PTR=isinstance(seed, torch.Tensor), SLICES_PAD=MAX_SLICES, SLICE=slice_tokens, LANES=lanes,
        NCP=next_pow2(cdiv(vocab, lanes)), FRONTIER=use_frontier, K=FRONTIER_K, num_warps=NUM_WARPS)

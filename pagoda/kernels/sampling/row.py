"""Sorting-free samplers: category, top-k, top-p, min-p (and joint) sampling (chain speculative sampling:
`pagoda.kernels.sampling.speculative`).

One program per output row streams the vocabulary in chunks of ``BLOCK`` tokens; token t belongs to
lane ``t % BLOCK`` (LANES = BLOCK per-lane accumulators, 4-8 per thread). No sort, no host
synchronisation, no data-dependent launch: safe inside a captured CUDA graph.

Two-level draw (no per-token random numbers in the streaming passes). A pass over a candidate set
``S = {p >= a}`` (fp32 bit patterns order like the values for p >= 0, so every set here is
``{bits(p) >= a}``; NaN and negative entries never belong) accumulates the mass of S per lane. A lane
is then drawn with probability proportional to its mass (an exponential race over the LANES masses:
``argmax w_l / E_l``), and a token of that lane in proportion to p (a race over the lane's
``ceil(vocab / LANES)`` tokens, re-read from L2): together an exact draw from p restricted to S. The
exponentials come from Philox (`_exp_at`): counter ``offset + row*ceil(vocab/4) + idx // 4``, lane
``idx % 4``, third counter word = the draw's stage, so every draw of a row uses fresh numbers
(same seed, shapes and launch config give the same tokens). Races over whole lane ranges take all four
words of each counter at once (`_exp_run`: the same numbers, a quarter of the Philox calls).

Filters keep an upper set ``N = {p >= b}`` (top-k: b = k-th largest value, ties kept; top-p: b = t*,
the largest value with ``mass(p >= t*) >= top_p * total``; min-p: ``min_p * max``; joint: the
largest of those). Equivalently ``b = max(sup{t : P(t)}, thr)`` with the monotone predicate
``P(t) = count(p >= t) >= k  or  mass(p >= t) >= top_p * total``.

Pass 0 computes the total, the per-lane masses, and per lane the two largest values and the third
largest value (no token indices: a winner is found again in its lane). Let C be the 2*LANES tracked
tokens and m3 the largest third
value: every untracked token is <= m3, so for t > m3 the count and mass of ``{p >= t}`` are exact
from C alone. A bisection over C (in registers) finds t_C = the largest t with P_C(t); since C's
counts and masses are lower bounds, ``b >= t_C``, and if ``max(t_C, thr) > m3`` then b is exactly
that and N lies inside C ("resolved"): the token is the exponential race over ``N`` in registers and
the row costs ONE pass. With softmax(N(0, 3^2)) rows of 151,936 tokens and LANES = 1024, C holds the
top ~150 tokens (a lane holding three of them is rare), so top-k 50, min-p 0.05 and top-p over a
top-k floor resolve in one pass; top-p 0.9 (thousands of tokens) does not.

Unresolved rows use rejection rounds with fresh draws (exact: each round draws from p restricted to
a superset of N and accepts iff the token is in N). State: ``a <= b <= high`` (bits). The first
candidate c comes from pass 0's lane masses. A round is ONE pass over ``A = {p >= max(a, p_c+1ulp)}``
and ``B = {p >= mid}`` (mid halfway between that and high): A's count/mass decide whether c is in N
(``count/mass(p > p_c)``), B's whether ``b >= mid``; the next candidate is drawn from B (then a = mid)
or A (then high = mid - 1) with their lane masses. The bit interval at least halves per rejected
round (<= 32 rounds, ``MAX_ROUNDS`` = 34) and in expectation ~1/mass(N) rounds are needed: top-p 0.9
takes pass 0 + one round with probability >= 0.9. A candidate with ``p_c >= high`` is in N without a
pass (min-p alone: a = high = thr).

Cost per token and pass (sm_90 SASS of the loops, fp32 input, 128-bit loads): pass 0 without filters
~5 (load, compare, select, add), with the top-two tracking ~14, a top-p round ~8 (two set tests, two
masked adds; +2 counts for top-k). The old kernel drew an exponential per token in EVERY pass (Philox-4x32-10 ~25
instr/token, log ~20, IEEE divide ~10, two race folds ~8: ~75-90 per token and pass), i.e. it was
compute-bound at 5-10x the memory floor; now every pass is memory-bound (~20-33 instr/token balance
on an H200) and typical passes are: sampling 1, top-k 1, min-p 1, top-k-first top-p 1, joint 1, top-p ~2.1.

"top_k_first" (top-p over the renormalised top-k set, ``K_FIRST``) uses the exact k-th value b_k of
the row as a floor: tokens below it do not exist for the sampler, so its total, and hence the top-p
target, is the top-k mass. Nothing is written out, and it is ONE launch: C's k-th largest value is
b_k whenever it lies above m3 (counts above m3 are exact), and then C restricted to ``{p >= b_k}`` is
exactly what pass 0 with that floor would have tracked, so the row still costs one pass. Otherwise
(some lane holds three of the top k: ~C(k,3)/LANES^2 of the rows, 0.1% for k = 50 and 4096 lanes)
`_kth_value_bits` settles b_k with one more pass that also holds the whole top-k set (rarely a counting
bisection, then pass 0 is repeated over the floor). (A separate pivot-search kernel, `filters.top_k_floor`,
costs 6-8 unpipelined passes on those rows, which would set the time of the whole batch.)
Rows with no positive, finite-comparable mass (all zero / NaN) return token 0 with ``valid = False``.
Every stored token is in ``[0, vocab)``. Logits (`sampling_from_logits`) use the Gumbel race with a
per-token exponential (`_philox_chunk` layout), one pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels._common import sm_count
from pagoda.kernels.launch.fast import cdiv, launch, next_pow2
from pagoda.kernels.sampling.kth import _count_cut, _kth_value_bits, _peeled_floor_set  # noqa: F401
from pagoda.kernels.sampling.race import (  # noqa: F401
    _chunk_row_quads,
    _exp1,
    _exp_at,
    _exp_run,
    _in_set,
    _philox_chunk,
    _philox_state,
    _race_fold,
    _race_key,
    _race_winner,
    _row_param,
    _source_row,
    int32_words,
)

MAX_ROUNDS = 34


@triton.jit
def _lane_draw(lane_w, lanes, base, a_bits, seed, rng_base, stage, vocab, LANES: tl.constexpr,
               NCP: tl.constexpr):
    """Exact draw from p restricted to ``{p >= a}`` given that set's per-lane masses ``lane_w``: a lane
    by an exponential race over the masses (stage), then a token of the lane (stage + 1). -1 if the
    set is empty."""
    e = _exp_run(seed, rng_base, 0, LANES, stage)
    has = lane_w > 0.0
    key = tl.where(has, lane_w / e, -1.0)
    best = tl.max(key, 0)
    lane = tl.min(tl.where(has & (key == best), lanes, LANES), 0)
    cols = lane + tl.arange(0, NCP) * LANES
    live = tl.where(lane < LANES, cols < vocab, False)  # (vector & scalar: int32 in the 3.9 interpreter)
    x = tl.load(base + cols, mask=live, other=0.0).to(tl.float32)
    elig = live & _in_set(x, a_bits)
    key2 = tl.where(elig, x / _exp_at(seed, rng_base, cols, stage + 1), -1.0)
    best2 = tl.max(key2, 0)
    tok = tl.min(tl.where(elig & (key2 == best2), cols, 2147483647), 0)
    return tl.where(tok == 2147483647, -1, tok)


@triton.jit
def _filter_pred(cnt, mass, k, k_on, target, p_on, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr):
    """``P`` at a threshold t from ``count/mass(p >= t)``: t is at or below the filters' bound."""
    pred = tl.zeros((), tl.int32) != 0
    if HAS_TOP_K:
        pred = pred | (k_on & (cnt >= k))
    if HAS_TOP_P:
        pred = pred | (p_on & (mass >= target))
    return pred


@triton.jit
def _pred_over_c(v1, v2, t_bits, k, k_on, target, p_on, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr):
    """``P`` at threshold bits ``t_bits`` from the tracked set C (each lane's two largest values): exact
    above m3, a lower bound of the row's count / mass below it."""
    t = t_bits.to(tl.float32, bitcast=True)
    in1 = v1 >= t
    in2 = v2 >= t
    cnt = 0
    mass = 0.0
    if HAS_TOP_K:
        cnt = tl.sum(in1.to(tl.int32) + in2.to(tl.int32), 0)
    if HAS_TOP_P:
        mass = tl.sum(tl.where(in1, v1, 0.0) + tl.where(in2, v2, 0.0), 0)
    return _filter_pred(cnt, mass, k, k_on, target, p_on, HAS_TOP_K, HAS_TOP_P)


@triton.jit
def _track_pass(base, a0, vocab, lanes, BLOCK: tl.constexpr, TRACK: tl.constexpr):
    """One pass over the row: per-lane mass of ``{p >= a0}`` and, with TRACK, each lane's two largest
    values of that set and its third largest (0 where none). No token indices: a winner is found
    again in its lane."""
    tot = tl.zeros((BLOCK,), tl.float32)
    v1 = tl.zeros((BLOCK,), tl.float32)
    v2 = tl.zeros((BLOCK,), tl.float32)
    v3 = tl.zeros((BLOCK,), tl.float32)
    if not TRACK:
        # Plain mass (~30 registers a thread): four chunks in flight. A batch-1 row streams on one SM, at
        # (bytes in flight) / (DRAM latency): 2 chunks of 16 KB read ~32 GB/s on the H200.
        x1 = tl.load(base + lanes, mask=lanes < vocab, other=0.0)
        x2 = tl.load(base + (lanes + BLOCK), mask=lanes + BLOCK < vocab, other=0.0)
        x3 = tl.load(base + (lanes + 2 * BLOCK), mask=lanes + 2 * BLOCK < vocab, other=0.0)
        for start in range(0, vocab, BLOCK):
            cols = start + lanes + 3 * BLOCK
            x = x1.to(tl.float32)
            x1 = x2
            x2 = x3
            x3 = tl.load(base + cols, mask=cols < vocab, other=0.0)
            tot += tl.where(_in_set(x, a0), x, 0.0)
        return tot, v1, v2, v3
    x_next = tl.load(base + lanes, mask=lanes < vocab, other=0.0)
    for start in range(0, vocab, BLOCK):
        # The next chunk's load is issued before this one is folded: two loads in flight.
        cols = start + lanes
        x = x_next.to(tl.float32)
        x_next = tl.load(base + (cols + BLOCK), mask=cols + BLOCK < vocab, other=0.0)
        v = tl.where(_in_set(x, a0), x, 0.0)
        tot += v
        if TRACK:
            lo_v = tl.minimum(v, v1)
            v1 = tl.maximum(v, v1)
            v3 = tl.maximum(v3, tl.minimum(lo_v, v2))
            v2 = tl.maximum(v2, lo_v)
    return tot, v1, v2, v3


@triton.jit
def _logits_race(base, seed, rng_base, vocab, temperature, BLOCK: tl.constexpr, HAS_TEMP: tl.constexpr):
    """Gumbel-max over logits (divided by ``temperature`` with HAS_TEMP), one exponential per token
    (`_philox_chunk` layout): the winner, -1 if every logit is -inf or NaN."""
    Q: tl.constexpr = BLOCK // 4
    offs = tl.arange(0, Q)
    key_v = tl.full((Q,), float("-inf"), tl.float32)
    idx_v = tl.full((Q,), -1, tl.int32)
    for start in range(0, vocab, BLOCK):
        rs = _philox_chunk(seed, rng_base, start, offs)
        for j in tl.static_range(4):
            cols = start + j * Q + offs
            inb = cols < vocab
            x = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
            if HAS_TEMP:
                x = x / temperature
            elig = inb & (x > float("-inf"))  # NaN compares false: never eligible
            key_v, idx_v = _race_fold(_race_key(x, _exp1(rs[j]), True), elig, cols, key_v, idx_v)
    return _race_winner(key_v, idx_v)


# Arguments that change with the batch, the step or the request mix (the rows' count, the seed and the Philox
# offset, the per-row strides of the seed tensors, the shared top-k): one compiled kernel serves every value.
_RUNTIME_INTS = ["num_rows", "seed_stride", "offset_stride", "seed_lo", "seed_hi", "offset_lo", "offset_hi",
                 "top_k_val"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _sample_kernel(x_ptr, stride_x, rows_ptr, out_ptr, valid_ptr, top_k_ptr, top_p_ptr, min_p_ptr, floor_ptr,
                   temp_ptr, top_k_val, top_p_val, min_p_val,
                   seed_ptr, seed_stride, offset_ptr, offset_stride, seed_lo, seed_hi, offset_lo, offset_hi, vocab,
                   num_rows,
                   SCALAR_PARAMS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_TOP_K: tl.constexpr,
                   HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr, HAS_FLOOR: tl.constexpr, K_FIRST: tl.constexpr,
                   FROM_LOGITS: tl.constexpr, SEED_PTR: tl.constexpr, BLOCK: tl.constexpr, NCP: tl.constexpr,
                   ROUNDS: tl.constexpr, HAS_TEMP: tl.constexpr = False):
    """HAS_FLOOR: only tokens with ``p >= floor[i]`` exist for row i (its total, max, race and
    filters are those of that restricted, renormalised row). K_FIRST ("top_k_first", with HAS_TOP_P and
    without HAS_TOP_K/HAS_FLOOR): the same floor, the row's k-th largest value (``top_k_ptr``), is found
    in the kernel: from pass 0's tracked set when it settles it (no extra pass), else `_kth_value_bits`.
    BLOCK: tokens per loop step = lanes; NCP = next_power_of_2(ceil(vocab / BLOCK)). SCALAR_PARAMS: top-k /
    top-p / min-p are the ``*_val`` arguments, the same for every row (no ``[batch]`` tensor to fill).
    HAS_TEMP (with FROM_LOGITS): output i draws from ``softmax(logits / temp[i])`` (temp > 0)."""
    FILTERS: tl.constexpr = HAS_TOP_K or HAS_TOP_P or HAS_MIN_P or K_FIRST
    LANES: tl.constexpr = BLOCK
    pid = tl.program_id(0)
    row = _source_row(rows_ptr, pid, num_rows, HAS_ROWS)
    base = x_ptr + row * stride_x
    seed, off = _philox_state(pid, seed_ptr, seed_stride, offset_ptr, offset_stride, seed_lo, seed_hi, offset_lo,
                              offset_hi, SEED_PTR)
    if FROM_LOGITS:   # per-token numbers in whole chunks (`_philox_chunk`)
        rng_base = off + pid.to(tl.int64) * _chunk_row_quads(vocab, BLOCK)
    else:             # `_exp_at` / `_exp_run`: indices below vocab only
        rng_base = off + pid.to(tl.int64) * ((vocab + 3) // 4)
    lanes = tl.arange(0, LANES)

    if FROM_LOGITS:
        temperature = 1.0
        if HAS_TEMP:
            temperature = tl.load(temp_ptr + pid)
        cand = _logits_race(base, seed, rng_base, vocab, temperature, BLOCK, HAS_TEMP)
        accepted = (cand >= 0).to(tl.int32)
    else:
        a0 = 1  # bits of the smallest positive float
        if HAS_FLOOR:
            a0 = tl.maximum(tl.load(floor_ptr + pid).to(tl.int32, bitcast=True), 1)
        # Pass 0: per-lane mass of {p >= a0}; with filters, each lane's two largest values and its
        # third largest (0 where none).
        tot, v1, v2, v3 = _track_pass(base, a0, vocab, lanes, BLOCK, FILTERS)
        if K_FIRST:
            # top_k_first: the floor is the k-th largest value b_k. C (the 2*LANES tracked values) gives
            # count(p >= t) exactly for t > m3, so C's k-th largest t_k is b_k when t_k > m3; then the
            # whole top-k set lies in C and C restricted to it is exactly pass 0 with a0 = b_k (its
            # third values are 0): no further pass. Otherwise the exact k-th value costs pass 1 (rarely
            # more) and pass 0 is repeated over {p >= b_k}.
            kf = _row_param(top_k_ptr, top_k_val, pid, SCALAR_PARAMS, tl.int32)
            floor_bits = tl.full((), 1, tl.int32)
            if (kf > 0) & (kf < vocab):
                one = tl.full((LANES,), 1, tl.int32)
                zero = tl.zeros((LANES,), tl.int32)
                m3k = tl.max(v3, 0).to(tl.int32, bitcast=True)
                t_k = _count_cut(one, v1, one, v2, zero, v1, zero, v1, kf, tl.zeros((), tl.int32),
                                 tl.max(v1, 0).to(tl.int32, bitcast=True) + 1)
                if tl.maximum(t_k, 1) > m3k:
                    floor_bits = tl.maximum(t_k, 1)
                    v1 = tl.where(_in_set(v1, floor_bits), v1, 0.0)
                    v2 = tl.where(_in_set(v2, floor_bits), v2, 0.0)
                    v3 = tl.zeros((LANES,), tl.float32)
                    tot = v1 + v2
                else:
                    floor_bits, peeled, c2, e1, e2 = _kth_value_bits(base, v1, v2, t_k, m3k, kf, vocab, lanes,
                                                                     BLOCK)
                    if peeled:  # the top-k set is among the peeled entries: no repeat of pass 0
                        tot, v1, v2, v3 = _peeled_floor_set(v1, v2, c2, e1, e2, floor_bits)
                    else:
                        tot, v1, v2, v3 = _track_pass(base, floor_bits, vocab, lanes, BLOCK, FILTERS)
            a0 = floor_bits
        total = tl.sum(tot, 0)
        if not FILTERS:
            cand = _lane_draw(tot, lanes, base, a0, seed, rng_base, 2, vocab, LANES, NCP)
            accepted = (cand >= 0).to(tl.int32)
        else:
            pmax = tl.max(v1, 0)
            m3_bits = tl.max(v3, 0).to(tl.int32, bitcast=True)
            k = 0
            k_on = tl.zeros((), tl.int32) != 0
            top_p = 1.0
            p_on = k_on
            thr_bits = 0
            if HAS_TOP_K:
                k = _row_param(top_k_ptr, top_k_val, pid, SCALAR_PARAMS, tl.int32)
                k_on = (k > 0) & (k < vocab)  # disabled: keep every token
            if HAS_TOP_P:
                top_p = _row_param(top_p_ptr, top_p_val, pid, SCALAR_PARAMS, tl.float32)
                p_on = top_p < 1.0
            f_on = k_on | p_on  # an active top-k or top-p: b is not known before the search
            target = top_p * total
            if HAS_MIN_P:
                # Capped at the max: min_p > 1 keeps the most likely token(s), like every filter here.
                thr = tl.minimum(_row_param(min_p_ptr, min_p_val, pid, SCALAR_PARAMS, tl.float32) * pmax, pmax)
                thr_bits = thr.to(tl.int32, bitcast=True)
            # t_C = largest t with P over C (lower bounds of count/mass): b >= t_C. Bisection on bits
            # in (0, bits(pmax)]: lo keeps P true ("0" stands for "no bound"), hi keeps it false.
            lo = tl.zeros((), tl.int32)
            hi = pmax.to(tl.int32, bitcast=True) + 1
            search = f_on
            t3 = m3_bits + 1
            if f_on & (t3 < hi):
                # Above m3, C's counts and masses are exact: if P fails just above m3, t_C <= m3 and the
                # row is unresolved whatever t_C is (b > m3 only through thr or a0). Its rejection rounds
                # need a lower bound, and max(thr, a0) is one: skip the 31-step search (a block-wide
                # reduction per step). If P holds there, search (m3, pmax] only.
                above = _pred_over_c(v1, v2, t3, k, k_on, target, p_on, HAS_TOP_K, HAS_TOP_P)
                lo = tl.where(above, t3, lo)
                search = above
            if search:
                for _s in range(31):
                    if hi - lo > 1:
                        mid = lo + (hi - lo) // 2
                        ok = _pred_over_c(v1, v2, mid, k, k_on, target, p_on, HAS_TOP_K, HAS_TOP_P)
                        lo = tl.where(ok, mid, lo)
                        hi = tl.where(ok, hi, mid)
            b_bits = tl.maximum(tl.maximum(lo, thr_bits), a0)
            if b_bits > m3_bits:
                # Resolved: N = {p >= b} lies in C. Exponential race over it (stage 1); entry
                # ``lane + slot * LANES`` (< vocab whenever the entry exists) indexes its exponential.
                in1 = _in_set(v1, b_bits)
                in2 = _in_set(v2, b_bits)
                key1 = tl.where(in1, v1 / _exp_run(seed, rng_base, 0, LANES, 1), -1.0)
                key2 = tl.where(in2, v2 / _exp_run(seed, rng_base, LANES, LANES, 1), -1.0)
                best = tl.maximum(tl.max(key1, 0), tl.max(key2, 0))
                win = tl.minimum(tl.min(tl.where(in1 & (key1 == best), lanes, 2147483647), 0),
                                 tl.min(tl.where(in2 & (key2 == best), lanes + LANES, 2147483647), 0))
                lane = win % LANES
                w1 = tl.sum(tl.where(lanes == lane, v1, 0.0), 0)
                w2 = tl.sum(tl.where(lanes == lane, v2, 0.0), 0)
                val = tl.where(win < LANES, w1, w2)
                # The winner's token: the first of its lane equal to its value, or the second when it
                # is the lower of two equal values (the lane kept the first occurrence in front).
                cols = lane + tl.arange(0, NCP) * LANES
                # (not vector & scalar: that is int32 in the 3.9 interpreter)
                live = tl.where(win < 2147483647, cols < vocab, False)
                eq = live & (tl.load(base + cols, mask=live, other=0.0).to(tl.float32) == val)
                first = tl.min(tl.where(eq, cols, 2147483647), 0)
                second = tl.min(tl.where(eq & (cols > first), cols, 2147483647), 0)
                tok = tl.where((win >= LANES) & (w2 == w1), second, first)
                cand = tl.where(tok == 2147483647, -1, tok)
                accepted = (cand >= 0).to(tl.int32)
            else:
                # Rejection rounds. a <= b <= high; with no active top-k/top-p, b = max(thr, a0) exactly.
                a_bits = b_bits
                high = tl.where(f_on, m3_bits, b_bits)
                cand = _lane_draw(tot, lanes, base, a0, seed, rng_base, 2, vocab, LANES, NCP)
                done = (cand < 0).to(tl.int32)
                accepted = tl.zeros((), tl.int32)
                for r in range(ROUNDS):
                    c_bits = tl.load(base + tl.maximum(cand, 0)).to(tl.float32).to(tl.int32, bitcast=True)
                    if done == 0:
                        if c_bits >= high:  # p_c >= high >= b: in N without a pass
                            accepted = tl.full((), 1, tl.int32)
                            done = tl.full((), 1, tl.int32)
                    if done == 0:
                        known_out = c_bits < a_bits
                        low = tl.maximum(a_bits, c_bits + 1)
                        mid_bits = low + (high - low + 1) // 2
                        w_a = tl.zeros((LANES,), tl.float32)
                        w_b = tl.zeros((LANES,), tl.float32)
                        n_a = tl.zeros((LANES,), tl.int32)
                        n_b = tl.zeros((LANES,), tl.int32)
                        x_next = tl.load(base + lanes, mask=lanes < vocab, other=0.0)
                        for start in range(0, vocab, BLOCK):
                            cols = start + lanes
                            x = x_next.to(tl.float32)
                            x_next = tl.load(base + (cols + BLOCK), mask=cols + BLOCK < vocab, other=0.0)
                            in_a = _in_set(x, low)
                            in_b = _in_set(x, mid_bits)
                            w_a += tl.where(in_a, x, 0.0)
                            w_b += tl.where(in_b, x, 0.0)
                            if HAS_TOP_K:  # only the filters present pay for their statistics
                                n_a += in_a.to(tl.int32)
                                n_b += in_b.to(tl.int32)
                        cnt_a = tl.sum(n_a, 0)
                        cnt_b = tl.sum(n_b, 0)
                        mass_a = tl.sum(w_a, 0)
                        mass_b = tl.sum(w_b, 0)
                        # A = {p > p_c} unless c was known to be out: c in N iff not P(p_c + 1ulp)
                        # (or nothing lies above c: the most likely token(s) are always kept).
                        top = mass_a == 0.0
                        if HAS_TOP_K:
                            top = cnt_a == 0
                        inside = (~known_out) & (c_bits >= thr_bits) & (
                            top | ~_filter_pred(cnt_a, mass_a, k, k_on, target, p_on, HAS_TOP_K, HAS_TOP_P))
                        # A rejected c gives b >= low: with mid == low (high == low) B = A holds N.
                        above_mid = (mid_bits <= low) | (thr_bits >= mid_bits) | _filter_pred(
                            cnt_b, mass_b, k, k_on, target, p_on, HAS_TOP_K, HAS_TOP_P)
                        if inside:
                            accepted = tl.full((), 1, tl.int32)
                            done = tl.full((), 1, tl.int32)
                        else:
                            a_bits = tl.where(above_mid, mid_bits, low)
                            high = tl.where(above_mid, high, mid_bits - 1)
                            nxt = _lane_draw(tl.where(above_mid, w_b, w_a), lanes, base, a_bits, seed, rng_base,
                                             4 + 2 * r, vocab, LANES, NCP)
                            done = (nxt < 0).to(tl.int32)  # cannot happen with consistent sums
                            cand = tl.where(nxt < 0, cand, nxt)
    found = cand >= 0
    tl.store(out_ptr + pid, tl.where(found, cand, 0).to(out_ptr.dtype.element_ty))
    tl.store(valid_ptr + pid, (found & (accepted != 0)).to(tl.int8))


def launch_config(vocab: int, batch: int, device: torch.device, block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps): BLOCK tokens (= per-lane accumulators) per loop step, and the next step's
    load is issued before the current one is folded. One program streams one row: with fewer rows
    than SMs each program has an SM to itself, so 16 warps take 4096-token steps (8 tokens per thread
    per step, 16 in flight; ~90-110 registers); with more rows, 8 warps over 1024-token steps (4 per
    thread, ~50-65 registers) let 3-4 programs share an SM. No spills on sm_90 (ptxas -v). BLOCK >= 16."""
    if block is None:
        wide = batch < sm_count(device)
        block = 4096 if (wide and vocab >= 16384) else 1024
    block = max(16, min(block, next_pow2(vocab)))
    return block, (16 if block >= 4096 else 8 if block >= 1024 else 4)


def _seed_args(seed, offset, dummy: torch.Tensor):
    """(seed_ptr, seed_stride, offset_ptr, offset_stride, seed_lo, seed_hi, offset_lo, offset_hi, SEED_PTR);
    ``dummy`` stands in for the pointers when the seed is a host int (never read then), whose value goes as
    two int32 words (`int32_words`)."""
    if isinstance(seed, torch.Tensor):
        return (seed, 0 if seed.numel() == 1 else 1, offset, 0 if offset.numel() == 1 else 1, 0, 0, 0, 0, True)
    return (dummy, 0, dummy, 0, *int32_words(int(seed)), *int32_words(int(offset)), False)


def sample(x: torch.Tensor, out: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor | None,
           top_k: torch.Tensor | None, top_p: torch.Tensor | None, min_p: torch.Tensor | None,
           seed, offset, from_logits: bool = False, block: int | None = None,
           floor: torch.Tensor | None = None, k_first: bool = False, warps: int | None = None,
           temperature: torch.Tensor | None = None) -> None:
    """Launch the race sampler.

    x: ``[num_rows, vocab]`` probabilities (fp32/fp16/bf16, rows need not sum to 1) or, with
    ``from_logits`` (no filters), logits; last dim contiguous. out: ``[batch]`` int32/int64;
    valid: ``[batch]`` bool. rows: optional int ``[batch]`` mapping outputs to rows of x.
    top_k int32 / top_p, min_p float32: ``[batch]`` tensors, Python numbers (the same for every row: passed
    as kernel arguments, so no fill kernel runs, not even inside a captured graph) or None. floor: float32
    ``[batch]`` or None: restrict row i to ``{p >= floor[i]}`` before everything else (see `top_k_floor`). k_first:
    "top_k_first"
    filtering (needs top_k and top_p, no floor): top-p over the renormalised top-k set, the k-th value
    found in the kernel. seed/offset: ints or int64 device tensors of length 1 or batch (graph-capturable).
    temperature: with ``from_logits`` only, float32 ``[batch]`` (> 0): output i draws from
    ``softmax(x[row] / temperature[i])``, in the same one pass.
    block / warps: override `launch_config`'s choice (tests and benchmarks).
    """
    if k_first and (top_k is None or top_p is None or floor is not None):
        raise ValueError("k_first needs top_k and top_p and no floor")
    if temperature is not None and not from_logits:
        raise ValueError("temperature needs from_logits")
    batch, vocab = out.shape[0], x.shape[1]
    if batch == 0:
        return
    params = [top_k, top_p, min_p]
    scalar = not any(isinstance(v, torch.Tensor) for v in params)
    if not scalar:  # mixed: every parameter as a [batch] tensor
        params = [torch.full((batch,), v, dtype=torch.int32 if i == 0 else torch.float32, device=x.device)
                  if v is not None and not isinstance(v, torch.Tensor) else v for i, v in enumerate(params)]
    top_k, top_p, min_p = params
    # Scalar values (0 where absent); top_k >= vocab keeps every token, as the kernel's clamp of a tensor value
    # does, and stays an int32 argument.
    vals = [0, 0.0, 0.0]
    if scalar:
        vals = [min(int(top_k), vocab) if top_k is not None else 0, *(float(v) if v is not None else 0.0
                                                                       for v in (top_p, min_p))]
    seed_args = _seed_args(seed, offset, out)
    block, default_warps = launch_config(vocab, batch, x.device, block)
    warps = warps or default_warps
    dummy = out
    launch(
        _sample_kernel, (batch,),
        x, x.stride(0), rows if rows is not None else dummy, out, valid.view(torch.int8),
        *(v if isinstance(v, torch.Tensor) else dummy for v in params), floor if floor is not None else dummy,
        temperature if temperature is not None else dummy, *vals, *seed_args[:-1], vocab, x.shape[0],
        SCALAR_PARAMS=scalar, HAS_ROWS=rows is not None, HAS_TOP_K=top_k is not None and not k_first,
        HAS_TOP_P=top_p is not None, HAS_MIN_P=min_p is not None, HAS_FLOOR=floor is not None, K_FIRST=k_first,
        FROM_LOGITS=from_logits, SEED_PTR=seed_args[-1],
        BLOCK=block, NCP=next_pow2(cdiv(vocab, block)), ROUNDS=MAX_ROUNDS, HAS_TEMP=temperature is not None,
        num_warps=warps)

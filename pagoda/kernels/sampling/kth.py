"""The k-th largest value of a row for "top_k_first" sampling (`pagoda.kernels.sampling.row`, K_FIRST), when
pass 0's tracked set did not settle it: one "peel" pass one level deeper per lane, a bisection over the
peeled entries in registers, and (rarely) counting passes; then the floor set from the peeled entries.
"""
from __future__ import annotations

import triton
import triton.language as tl

from pagoda.kernels.sampling.race import _in_set


@triton.jit
def _count_cut(n1, w1, n2, w2, n3, w3, n4, w4, k, lo, hi):
    """Largest bits t in [lo, hi) with ``sum_j n_j * (w_j >= t) >= k`` over per-lane entries (values w_j
    with multiplicities n_j), by bisection; requires the count at ``lo`` to qualify (lo = 0 stands for
    "no bound") and the one at ``hi`` not to."""
    for _s in range(32):
        if hi - lo > 1:
            mid = lo + (hi - lo) // 2
            t = mid.to(tl.float32, bitcast=True)
            cnt = tl.sum(tl.where(w1 >= t, n1, 0) + tl.where(w2 >= t, n2, 0) + tl.where(w3 >= t, n3, 0)
                         + tl.where(w4 >= t, n4, 0), 0)
            lo = tl.where(cnt >= k, mid, lo)
            hi = tl.where(cnt >= k, hi, mid)
    return lo


@triton.jit
def _kth_value_bits(base, v1, v2, lo, m3_bits, k, vocab, lanes, BLOCK: tl.constexpr):
    """Exact bits of the k-th largest positive value of the row (1 = the smallest positive float when
    fewer than k are positive), for rows where pass 0's tracked set C did not settle it: the k-th
    largest of C (``lo``, a lower bound) is <= m3, the largest untracked bound.

    Pass 1 "peels" each lane one level deeper: the number of tokens equal to the lane's v2 and the two
    largest values strictly below v2 (and the third, e3). A lane's entries are then v1 (once, if above
    v2), v2 (c2 times), e1, e2, and every other token is <= e3: counts above ``max e3`` are exact, so the
    cut is settled unless some lane holds five or more tokens above the cut (on softmax rows of 151,936
    tokens, k = 50 and 1024 lanes: ~2e-4 of the rows that reach here, i.e. ~4e-6 of all rows). Those
    bisect the remaining bit interval with one counting pass per step (<= 31 passes: exact, slow, rare)."""
    c2 = tl.zeros((BLOCK,), tl.int32)
    e1 = tl.zeros((BLOCK,), tl.float32)
    e2 = tl.zeros((BLOCK,), tl.float32)
    e3 = tl.zeros((BLOCK,), tl.float32)
    x_next = tl.load(base + lanes, mask=lanes < vocab, other=0.0)
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        x = x_next.to(tl.float32)
        x_next = tl.load(base + (cols + BLOCK), mask=cols + BLOCK < vocab, other=0.0)
        v = tl.where(_in_set(x, 1), x, 0.0)
        c2 += ((v == v2) & (v2 > 0.0)).to(tl.int32)
        u = tl.where(v < v2, v, 0.0)
        lo_u = tl.minimum(u, e1)
        e1 = tl.maximum(u, e1)
        e3 = tl.maximum(e3, tl.minimum(lo_u, e2))
        e2 = tl.maximum(e2, lo_u)
    one = tl.full((BLOCK,), 1, tl.int32)
    n1 = (v1 > v2).to(tl.int32)  # a v1 above v2 occurs once in its lane (a second copy would be v2)
    m_bits = tl.max(e3, 0).to(tl.int32, bitcast=True)
    # Counts are exact above max(m_bits, m3_bits) (tokens above m3 are all in C), so the count at
    # m3 + 1ulp is below k (the C cut was <= m3): the search stays in [lo, m3_bits + 1).
    lo = _count_cut(n1, v1, c2, v2, one, e1, one, e2, k, lo, m3_bits + 1)
    peeled = tl.maximum(lo, 1) > m_bits
    hi = tl.where(peeled, lo + 1, m_bits + 1)
    for _p in range(31):
        if hi - lo > 1:
            mid = lo + (hi - lo) // 2
            n_v = tl.zeros((BLOCK,), tl.int32)
            x_next = tl.load(base + lanes, mask=lanes < vocab, other=0.0)
            for start in range(0, vocab, BLOCK):
                cols = start + lanes
                x = x_next.to(tl.float32)
                x_next = tl.load(base + (cols + BLOCK), mask=cols + BLOCK < vocab, other=0.0)
                n_v += _in_set(x, mid).to(tl.int32)
            ok = tl.sum(n_v, 0) >= k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
    return tl.maximum(lo, 1), peeled, c2, e1, e2


@triton.jit
def _peeled_floor_set(v1, v2, c2, e1, e2, f_bits):
    """Pass 0's state over ``{p >= f}`` (lane masses, top two, third) from the peeled entries, when
    ``f`` is above every lane's e3 (the whole set is among them): a lane's entries in descending order
    are v1 (once, if above v2), v2 (c2 times), e1, e2, so its i-th largest member is the entry whose
    cumulative count first exceeds i."""
    n_a = ((v1 > v2) & _in_set(v1, f_bits)).to(tl.int32)
    n_b = tl.where(_in_set(v2, f_bits), c2, 0)
    n_c = _in_set(e1, f_bits).to(tl.int32)
    n_d = _in_set(e2, f_bits).to(tl.int32)
    tot = n_a.to(tl.float32) * v1 + n_b.to(tl.float32) * v2 + n_c.to(tl.float32) * e1 + n_d.to(tl.float32) * e2
    c_a = n_a
    c_b = c_a + n_b
    c_c = c_b + n_c
    c_d = c_c + n_d
    w1 = tl.where(0 < c_a, v1, tl.where(0 < c_b, v2, tl.where(0 < c_c, e1, tl.where(0 < c_d, e2, 0.0))))
    w2 = tl.where(1 < c_a, v1, tl.where(1 < c_b, v2, tl.where(1 < c_c, e1, tl.where(1 < c_d, e2, 0.0))))
    w3 = tl.where(2 < c_a, v1, tl.where(2 < c_b, v2, tl.where(2 < c_c, e1, tl.where(2 < c_d, e2, 0.0))))
    return tot, w1, w2, w3

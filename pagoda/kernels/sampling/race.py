"""Random draws and exponential races of the sorting-free samplers (`pagoda.kernels.sampling.row`,
`pagoda.kernels.sampling.speculative`): Philox counters laid out per token, Exp(1) variates exact in the tail, and
the per-lane race state (largest key wins, lowest index on ties) that is reduced once after the loop.
"""
from __future__ import annotations

import triton
import triton.language as tl

INF_BITS = tl.constexpr(0x7F800000)  # bits of +inf: larger patterns are NaN


@triton.jit
def _philox_chunk(seed, quad_base, start, offs):
    """Four ``[Q]`` uint32 draws for the chunk of ``4 * Q`` tokens at ``start`` (``offs = arange(Q)``):
    token ``start + j*Q + q`` takes lane j of Philox counter ``quad_base + start // 4 + q``. One Philox
    call feeds 4 tokens, and each lane already has the layout of a contiguous ``[Q]`` sub-block load
    (no register shuffles through shared memory)."""
    return tl.randint4x(seed, quad_base + start // 4 + offs)


@triton.jit
def _source_row(rows_ptr, pid, num_rows, HAS_ROWS: tl.constexpr):
    """Row of x that output ``pid`` draws from: ``rows[pid]`` clamped to ``[0, num_rows)`` (a bad index can
    never address outside x; the ops layer checks indices off-graph), else ``pid``. int64."""
    if HAS_ROWS:
        row = tl.minimum(tl.maximum(tl.load(rows_ptr + pid).to(tl.int64), 0), num_rows - 1)
    else:
        row = pid.to(tl.int64)
    return row


@triton.jit
def _row_param(ptr, val, pid, SCALAR: tl.constexpr, DTYPE: tl.constexpr):
    """Output ``pid``'s value of a filter parameter (top_k / top_p / min_p) as DTYPE: the scalar kernel argument
    ``val`` (SCALAR: the same for every row) or ``ptr[pid]``."""
    if SCALAR:
        v = val + tl.zeros((), DTYPE)
    else:
        v = tl.load(ptr + pid).to(DTYPE)
    return v


@triton.jit
def _join_words(lo, hi):
    """The int64 whose low and high 32 bits are those of the int32 arguments ``lo`` and ``hi``."""
    return (hi.to(tl.int64) << 32) | lo.to(tl.uint32, bitcast=True).to(tl.int64)


@triton.jit
def _philox_state(pid, seed_ptr, seed_stride, offset_ptr, offset_stride, seed_lo, seed_hi, offset_lo, offset_hi,
                  SEED_PTR: tl.constexpr):
    """(int64 seed, int64 offset) of output ``pid``: from int64 device tensors (length 1 or batch: the
    graph-capturable form) or the host ints, each passed as two int32 words (`int32_words`)."""
    if SEED_PTR:
        seed = tl.load(seed_ptr + pid * seed_stride).to(tl.int64)
        off = tl.load(offset_ptr + pid * offset_stride).to(tl.int64)
    else:
        seed = _join_words(seed_lo, seed_hi)
        off = _join_words(offset_lo, offset_hi)
    return seed, off


def int32_words(v: int) -> tuple[int, int]:
    """``(lo, hi)``: the low and high 32 bits of ``v`` as a 64-bit two's complement value, each as a signed
    int32 (`_join_words` puts them back together). Triton types a host int argument by its range (int32 below
    2**31, else int64 or uint64) and specialises it on ``== 1`` and divisibility by 16, so the raw seed and
    the offset, which advances every call, would each select their own compiled kernel; two int32 words
    marked ``do_not_specialize`` are one argument type for every value."""
    v &= (1 << 64) - 1
    lo, hi = v & 0xFFFFFFFF, v >> 32
    return lo - (1 << 32) if lo >= 1 << 31 else lo, hi - (1 << 32) if hi >= 1 << 31 else hi


@triton.jit
def _chunk_row_quads(vocab, BLOCK: tl.constexpr):
    """Philox counters one row takes in the `_philox_chunk` layout: BLOCK / 4 per BLOCK-token chunk, the last,
    partial chunk included (its tokens use counters up to the chunk's end). Rows must be this far apart:
    ``ceil(vocab / 4)`` let a row's last tokens share counters, hence numbers, with the next row's first."""
    return ((vocab + BLOCK - 1) // BLOCK) * (BLOCK // 4)


@triton.jit
def _exp1(r):
    """Exp(1) from uint32 ``r``: ``E = -log(1 - w)`` with ``w = (2^31 - (r >> 1)) / 2^31`` in (0, 1].

    Small E decide the race for unlikely tokens, so they must not be quantised: ``w`` is exact there
    (a small integer times 2^-31) and below 1e-3 ``E`` comes from its series instead of ``log`` of a
    float near 1 (whose 2^-24 spacing would make E >= 6e-8 and under-sample tokens with p ~ 1e-7).
    """
    r = (r >> 1).to(tl.int32)  # uint32 -> [0, 2^31)
    w = ((2147483647 - r).to(tl.float32) + 1.0) * 4.656612873077393e-10
    e = tl.where(w < 1e-3, w + w * w * (0.5 + w * 0.3333333333333333), -tl.log(1.0 - w))
    return tl.minimum(e, 1e30)  # w == 1 gives inf: keep keys finite


@triton.jit
def _exp_at(seed, rng_base, idx, stage):
    """Exp(1) for index ``idx`` (a token, or a lane < vocab) in draw ``stage`` (>= 1) of a row: lane
    ``idx % 4`` of Philox counter ``(rng_base + idx // 4, stage, 0)``. Stages never repeat within a
    call, and the row's counters never reach the next row's, so all draws are independent."""
    c = rng_base + (idx // 4).to(tl.int64)
    zero = (idx * 0).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c.to(tl.uint32), (c >> 32).to(tl.uint32), (idx * 0 + stage).to(tl.uint32),
                               zero)
    q = idx % 4
    return _exp1(tl.where(q == 0, r0, tl.where(q == 1, r1, tl.where(q == 2, r2, r3))))


@triton.jit
def _exp_run(seed, rng_base, start, N: tl.constexpr, stage):
    """Exp(1) for the N indices ``start .. start + N - 1`` (start and N multiples of 4): the numbers
    `_exp_at` gives there, from one Philox call per 4 indices (all four output words; `_exp_at` spends a
    call per index). A lane race over 4096 lanes then costs 2 Philox calls per thread instead of 8 (16
    warps): at batch 1 those calls were most of the ~2-4 µs a race took on the row's one SM."""
    q = tl.arange(0, N // 4)
    c = rng_base + (start // 4 + q).to(tl.int64)
    zero = (q * 0).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c.to(tl.uint32), (c >> 32).to(tl.uint32), (q * 0 + stage).to(tl.uint32),
                               zero)
    # join adds a last axis: [N/4, 2, 2] with [i, k, j] = word 2k + j of counter i -> flat index 4i + 2k + j.
    return _exp1(tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (N,)))


@triton.jit
def _race_key(x, e, FROM_LOGITS: tl.constexpr):
    """Race key per token (larger wins): ``-E/p`` for probabilities, ``x - log E`` (Gumbel) for logits."""
    if FROM_LOGITS:
        return x - tl.log(e)
    # Clamp so a positive but tiny p keeps a finite key (it must stay eligible, just a sure loser).
    return tl.maximum(-e / x, -3.0e38)


@triton.jit
def _race_fold(key, eligible, cols, lane_key, lane_idx):
    """Fold a chunk into per-lane race state. Lanes are only reduced after the loop, so the hot loop
    has no cross-thread reduction; strict '>' keeps each lane's lowest index on exact ties."""
    key = tl.where(eligible, key, float("-inf"))
    better = key > lane_key
    return tl.where(better, key, lane_key), tl.where(better, cols, lane_idx)


@triton.jit
def _race_winner(lane_key, lane_idx):
    """Largest key over the lanes, lowest index among equal keys; -1 when nothing was eligible."""
    best = tl.max(lane_key, 0)
    idx = tl.min(tl.where((lane_key == best) & (lane_idx >= 0), lane_idx, 2147483647), 0)
    return tl.where(idx == 2147483647, -1, idx)


@triton.jit
def _in_set(x, a_bits):
    """``x`` (fp32) in ``{p >= a}`` for ``a_bits >= 1``: positive, not NaN, bits at least a's."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits >= a_bits) & (bits <= INF_BITS)

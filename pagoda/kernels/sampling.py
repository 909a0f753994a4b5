"""Sorting-free samplers: category, top-k, top-p, min-p (and joint) sampling, chain speculative sampling.

Algorithm (one program per output row, the vocabulary streamed in ``BLOCK`` chunks; no sort, no host
synchronisation, no data-dependent launch: safe inside a captured CUDA graph).

1. Exponential race. Each token i gets ``E_i ~ Exp(1)`` from Philox: in chunk c of ``BLOCK = 4Q``
   tokens, token ``c*BLOCK + j*Q + q`` takes lane j of counter ``offset + row*ceil(vocab/4) + c*Q + q``
   (so draws depend on BLOCK: same seed, shapes and launch config give the same tokens). ``argmax_{i in S} p_i / E_i`` (computed as
   ``-E_i / p_i``) is an exact draw from ``p`` restricted to S and renormalised, for ANY set S
   (the Gumbel-max trick in multiplicative form). The ``E_i`` are fixed for the call, so if the
   winner over a superset S of the kept set N lies in N it is also the winner over N: the token
   returned is exactly ``argmax_{i in N} p_i / E_i`` and the rejection rounds below add no bias.
2. Every filter keeps an upper set ``N = {p >= b}`` (top-k: b = k-th largest value, ties kept;
   top-p: b = t*, the largest value with ``mass(p >= t*) >= top_p * total``; min-p: ``min_p * max``;
   joint: the largest of those). A token j is in N iff
   ``count(p > p_j) < k``, ``mass(p > p_j) < top_p * total`` and ``p_j >= min_p * max``.
3. Rejection rounds. Pass 0 computes total, max and the race winner j over ``{p > 0}``. Each round is
   ONE pass that measures count/mass above ``p_j`` (the membership test) and, at the same time,
   the race winners over two candidate supersets of N for the case j is rejected:
   ``{p > p_j}`` and ``{p >= mid}``, where ``mid`` is the midpoint, in the bit pattern of fp32
   (monotone for p >= 0), of ``(p_j, high]``. If ``count/mass(p >= mid)`` proves ``b >= mid`` the
   next set is ``{p >= mid}``, else ``high = mid - 1ulp`` and the next set is ``{p > p_j}``.
   Invariant: the current set contains N and ``b <= high``. The bit interval holding b at least
   halves every rejected round, so a row finishes within 32 rounds (``MAX_ROUNDS`` = 34), and in
   expectation after ~1/mass(N) rounds: top-p 0.9 needs 2 passes with probability >= 0.9.
4. "top_k_first" (top-p over the renormalised top-k set) takes the exact k-th value of the row from
   `pagoda.kernels.sampling_filters.top_k_floor` as a floor: tokens below it do not exist for the
   sampler, so its total, and hence the top-p target, is the top-k mass. Nothing is written out.
Rows with no positive, finite-comparable mass (all zero / NaN) return token 0 with ``valid = False``.
Every stored token is in ``[0, vocab)``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_ROUNDS = 34


@triton.jit
def _philox_chunk(seed, quad_base, start, offs):
    """Four ``[Q]`` uint32 draws for the chunk of ``4 * Q`` tokens at ``start`` (``offs = arange(Q)``):
    token ``start + j*Q + q`` takes lane j of Philox counter ``quad_base + start // 4 + q``. One Philox
    call feeds 4 tokens, and each lane already has the layout of a contiguous ``[Q]`` sub-block load
    (no register shuffles through shared memory)."""
    return tl.randint4x(seed, quad_base + start // 4 + offs)


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
def _sample_kernel(x_ptr, stride_x, rows_ptr, out_ptr, valid_ptr, top_k_ptr, top_p_ptr, min_p_ptr, floor_ptr,
                   seed_ptr, seed_stride, offset_ptr, offset_stride, seed_val, offset_val, vocab, num_rows,
                   HAS_ROWS: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
                   HAS_MIN_P: tl.constexpr, HAS_FLOOR: tl.constexpr, FROM_LOGITS: tl.constexpr,
                   SEED_PTR: tl.constexpr, BLOCK: tl.constexpr, ROUNDS: tl.constexpr):
    """HAS_FLOOR: only tokens with ``p >= floor[i]`` exist for row i (its total, max, race and
    filters are those of that restricted, renormalised row): "top_k_first" with floor = the k-th value."""
    pid = tl.program_id(0)
    if HAS_ROWS:
        # Clamped so a bad index can never address outside x (the ops layer checks it off-graph).
        row = tl.minimum(tl.maximum(tl.load(rows_ptr + pid).to(tl.int64), 0), num_rows - 1)
    else:
        row = pid.to(tl.int64)
    base = x_ptr + row * stride_x
    if SEED_PTR:
        seed = tl.load(seed_ptr + pid * seed_stride)
        off = tl.load(offset_ptr + pid * offset_stride).to(tl.int64)
    else:
        seed = seed_val
        off = offset_val + tl.zeros((), tl.int64)
    rng_base = off + pid.to(tl.int64) * ((vocab + 3) // 4)
    Q: tl.constexpr = BLOCK // 4
    offs = tl.arange(0, Q)
    floor = 0.0
    if HAS_FLOOR:
        floor = tl.load(floor_ptr + pid)

    # Pass 0: row total and max, and the race winner over every eligible token. Chunks of BLOCK are
    # 4 sub-blocks of Q; every accumulator is per lane ([Q]) and reduced once after the loop.
    tot_v = tl.zeros((Q,), tl.float32)
    max_v = tl.zeros((Q,), tl.float32)
    key_v = tl.full((Q,), float("-inf"), tl.float32)
    idx_v = tl.full((Q,), -1, tl.int32)
    for start in range(0, vocab, BLOCK):
        rs = _philox_chunk(seed, rng_base, start, offs)
        for j in tl.static_range(4):
            cols = start + j * Q + offs
            inb = cols < vocab
            x = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
            if FROM_LOGITS:
                elig = inb & (x > float("-inf"))  # NaN compares false: never eligible
            else:
                elig = inb & (x > 0.0)
                if HAS_FLOOR:
                    elig = elig & (x >= floor)
            tot_v += tl.where(elig, x, 0.0)
            max_v = tl.maximum(max_v, tl.where(elig, x, 0.0))
            key_v, idx_v = _race_fold(_race_key(x, _exp1(rs[j]), FROM_LOGITS), elig, cols, key_v, idx_v)
    total = tl.sum(tot_v, 0)
    pmax = tl.max(max_v, 0)
    cand = _race_winner(key_v, idx_v)

    done = (cand < 0).to(tl.int32)
    accepted = (cand >= 0).to(tl.int32)
    if HAS_TOP_K or HAS_TOP_P or HAS_MIN_P:
        k = 0
        top_p = 1.0
        thr = 0.0
        if HAS_TOP_K:
            k = tl.load(top_k_ptr + pid)
            k = tl.where((k <= 0) | (k >= vocab), vocab, k)  # disabled: count(p > p_j) < vocab always
        if HAS_TOP_P:
            top_p = tl.load(top_p_ptr + pid).to(tl.float32)
        target = top_p * total
        if HAS_MIN_P:
            # Capped at the max: min_p > 1 keeps the most likely token(s), like every filter here.
            thr = tl.minimum(tl.load(min_p_ptr + pid).to(tl.float32) * pmax, pmax)
        high_bits = pmax.to(tl.int32, bitcast=True)
        cand_p = tl.load(base + tl.maximum(cand, 0)).to(tl.float32)
        accepted = tl.zeros((), tl.int32)
        for _r in range(ROUNDS):
            if not (HAS_TOP_K or HAS_TOP_P):
                # min-p alone needs no pass to test membership.
                hit = (done == 0) & ((cand_p >= thr) | (cand_p >= pmax))
                accepted = tl.where(hit, 1, accepted)
                done = tl.where(hit, 1, done)
            if done == 0:
                c_bits = cand_p.to(tl.int32, bitcast=True)
                mid_bits = tl.maximum(c_bits + (high_bits - c_bits + 1) // 2, c_bits + 1)
                if HAS_MIN_P:
                    mid_bits = tl.maximum(mid_bits, thr.to(tl.int32, bitcast=True))
                mid = mid_bits.to(tl.float32, bitcast=True)
                cnt_gt_v = tl.zeros((Q,), tl.int32)
                cnt_ge_v = tl.zeros((Q,), tl.int32)
                mass_gt_v = tl.zeros((Q,), tl.float32)
                mass_ge_v = tl.zeros((Q,), tl.float32)
                key_a = tl.full((Q,), float("-inf"), tl.float32)
                key_b = tl.full((Q,), float("-inf"), tl.float32)
                idx_a = tl.full((Q,), -1, tl.int32)
                idx_b = tl.full((Q,), -1, tl.int32)
                for start in range(0, vocab, BLOCK):
                    rs = _philox_chunk(seed, rng_base, start, offs)
                    for j in tl.static_range(4):
                        cols = start + j * Q + offs
                        inb = cols < vocab
                        x = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
                        gt = inb & (x > cand_p)
                        ge = inb & (x >= mid)
                        cnt_gt_v += gt.to(tl.int32)
                        if HAS_TOP_K:  # only the filters present pay for their statistics
                            cnt_ge_v += ge.to(tl.int32)
                        if HAS_TOP_P:
                            mass_gt_v += tl.where(gt, x, 0.0)
                            mass_ge_v += tl.where(ge, x, 0.0)
                        key = _race_key(x, _exp1(rs[j]), False)
                        key_a, idx_a = _race_fold(key, gt, cols, key_a, idx_a)
                        key_b, idx_b = _race_fold(key, ge, cols, key_b, idx_b)
                cnt_gt = tl.sum(cnt_gt_v, 0)
                cnt_ge = tl.sum(cnt_ge_v, 0)
                mass_gt = tl.sum(mass_gt_v, 0)
                mass_ge = tl.sum(mass_ge_v, 0)
                cand_a = _race_winner(key_a, idx_a)
                cand_b = _race_winner(key_b, idx_b)
                ok = cnt_gt == 0  # the most likely token(s) are always kept
                inside = cnt_gt >= 0
                above_mid = cnt_gt < 0
                if HAS_TOP_K:
                    inside = inside & (cnt_gt < k)
                    above_mid = above_mid | ((k < vocab) & (cnt_ge >= k))
                if HAS_TOP_P:
                    inside = inside & ((mass_gt < target) | (top_p >= 1.0))
                    above_mid = above_mid | ((top_p < 1.0) & (mass_ge >= target))
                if HAS_MIN_P:
                    inside = inside & (cand_p >= thr)
                    above_mid = above_mid | (thr >= mid)
                inside = inside | ok
                nxt = tl.where(above_mid, cand_b, cand_a)
                lost = nxt < 0  # cannot happen with consistent sums; stop with an in-range token
                high_bits = tl.where(inside | above_mid, high_bits, mid_bits - 1)
                accepted = inside.to(tl.int32)
                done = (inside | lost).to(tl.int32)
                cand = tl.where(inside | lost, cand, nxt)
                cand_p = tl.load(base + tl.maximum(cand, 0)).to(tl.float32)
    found = cand >= 0
    tl.store(out_ptr + pid, tl.where(found, cand, 0).to(out_ptr.dtype.element_ty))
    tl.store(valid_ptr + pid, (found & (accepted != 0)).to(tl.int8))


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def launch_config(vocab: int, batch: int, device: torch.device, block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps). One program streams one row: when there are fewer rows than SMs each
    program has an SM to itself, so it gets 16 warps and 8192-wide chunks (4 tokens per thread per
    sub-block: more loads in flight, ~100 registers); with more rows, 8 warps over 1024-wide chunks
    (~48 registers) let up to 8 programs share an SM. No spills on sm_90 (ptxas -v). BLOCK >= 16."""
    if block is None:
        wide = batch < sm_count(device)
        block = 8192 if (wide and vocab >= 32768) else 2048 if (wide and vocab >= 8192) else 1024
    block = max(16, min(block, triton.next_power_of_2(vocab)))
    return block, (16 if block >= 2048 else 8 if block >= 1024 else 4)


def _seed_args(seed, offset, dummy: torch.Tensor):
    """(seed_ptr, seed_stride, offset_ptr, offset_stride, seed_val, offset_val, SEED_PTR); ``dummy``
    stands in for the pointers when the seed is a host int (never read then)."""
    if isinstance(seed, torch.Tensor):
        return (seed, 0 if seed.numel() == 1 else 1, offset, 0 if offset.numel() == 1 else 1, 0, 0, True)
    return dummy, 0, dummy, 0, int(seed), int(offset), False


def sample(x: torch.Tensor, out: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor | None,
           top_k: torch.Tensor | None, top_p: torch.Tensor | None, min_p: torch.Tensor | None,
           seed, offset, from_logits: bool = False, block: int | None = None,
           floor: torch.Tensor | None = None) -> None:
    """Launch the race sampler.

    x: ``[num_rows, vocab]`` probabilities (fp32/fp16/bf16, rows need not sum to 1) or, with
    ``from_logits`` (no filters), logits; last dim contiguous. out: ``[batch]`` int32/int64;
    valid: ``[batch]`` bool. rows: optional int ``[batch]`` mapping outputs to rows of x.
    top_k int32 / top_p, min_p float32: ``[batch]`` tensors or None. floor: float32 ``[batch]`` or None:
    restrict row i to ``{p >= floor[i]}`` before everything else (see `top_k_floor`). seed/offset: ints or int64
    device tensors of length 1 or batch (graph-capturable).
    """
    batch, vocab = out.shape[0], x.shape[1]
    if batch == 0:
        return
    seed_args = _seed_args(seed, offset, out)
    block, warps = launch_config(vocab, batch, x.device, block)
    dummy = out
    _sample_kernel[(batch,)](
        x, x.stride(0), rows if rows is not None else dummy, out, valid.view(torch.int8),
        top_k if top_k is not None else dummy, top_p if top_p is not None else dummy,
        min_p if min_p is not None else dummy, floor if floor is not None else dummy, *seed_args[:6], vocab,
        x.shape[0],
        HAS_ROWS=rows is not None, HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None,
        HAS_MIN_P=min_p is not None, HAS_FLOOR=floor is not None, FROM_LOGITS=from_logits, SEED_PTR=seed_args[6],
        BLOCK=block, ROUNDS=MAX_ROUNDS, num_warps=warps)


@triton.jit
def _chain_spec_kernel(q_ptr, d_ptr, p_ptr, out_ptr, acc_ptr, emit_ptr, seed_ptr, seed_stride, offset_ptr,
                       offset_stride, seed_val, offset_val, n_spec, vocab,
                       s_qb, s_qn, s_db, s_pb, s_pn, s_ob,
                       SEED_PTR: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid.to(tl.int64)
    if SEED_PTR:
        seed = tl.load(seed_ptr + pid * seed_stride)
        off = tl.load(offset_ptr + pid * offset_stride).to(tl.int64)
    else:
        seed = seed_val
        off = offset_val + tl.zeros((), tl.int64)
    # Accept tests, all positions at once: draft token i passes iff u_i * q_i(d_i) < p_i(d_i).
    i = tl.arange(0, N_PAD)
    live = i < n_spec
    tok = tl.load(d_ptr + b * s_db + i, mask=live, other=0)
    tok = tl.minimum(tl.maximum(tok, 0), vocab - 1).to(tl.int64)
    qv = tl.load(q_ptr + b * s_qb + i * s_qn + tok, mask=live, other=0.0).to(tl.float32)
    pv = tl.load(p_ptr + b * s_pb + i * s_pn + tok, mask=live, other=0.0).to(tl.float32)
    # Counters [off, off + B*Vq) draw tokens (Vq = ceil(V/4)); the next B*n draw the accept tests.
    nb = tl.num_programs(0).to(tl.int64)
    u_test = tl.rand(seed, off + nb * ((vocab + 3) // 4) + b * n_spec + i)
    passed = live & (u_test * qv < pv)
    accepted = tl.sum(passed.to(tl.int32), 0)
    emitted = tl.min(tl.where(live & ~passed, i, n_spec), 0)
    # Final token: from max(p_e - q_e, 0) after a rejection at e, else the bonus from p_n. A second
    # race over p_e itself is the fallback when the residual is all zero (p_e == q_e).
    has_q = emitted < n_spec
    p_row = p_ptr + b * s_pb + emitted.to(tl.int64) * s_pn
    q_row = q_ptr + b * s_qb + emitted.to(tl.int64) * s_qn
    rng_base = off + b * ((vocab + 3) // 4)
    Q: tl.constexpr = BLOCK // 4
    offs = tl.arange(0, Q)
    key_r = tl.full((Q,), float("-inf"), tl.float32)
    key_p = tl.full((Q,), float("-inf"), tl.float32)
    idx_r = tl.full((Q,), -1, tl.int32)
    idx_p = tl.full((Q,), -1, tl.int32)
    for start in range(0, vocab, BLOCK):
        rs = _philox_chunk(seed, rng_base, start, offs)
        for j in tl.static_range(4):
            cols = start + j * Q + offs
            inb = cols < vocab
            pr = tl.load(p_row + cols, mask=inb, other=0.0).to(tl.float32)
            qr = tl.load(q_row + cols, mask=inb & has_q, other=0.0).to(tl.float32)
            resid = pr - qr
            e = _exp1(rs[j])
            key_r, idx_r = _race_fold(_race_key(resid, e, False), inb & (resid > 0.0), cols, key_r, idx_r)
            key_p, idx_p = _race_fold(_race_key(pr, e, False), inb & (pr > 0.0), cols, key_p, idx_p)
    cand_r = _race_winner(key_r, idx_r)
    cand_p = _race_winner(key_p, idx_p)
    final = tl.where(cand_r >= 0, cand_r, tl.maximum(cand_p, 0))
    j = tl.arange(0, N_PAD * 2)
    draft = tl.load(d_ptr + b * s_db + j, mask=j < n_spec, other=-1)
    row_out = tl.where(j < emitted, draft, tl.where(j == emitted, final, -1))
    tl.store(out_ptr + b * s_ob + j, row_out.to(out_ptr.dtype.element_ty), mask=j <= n_spec)
    tl.store(acc_ptr + pid, accepted)
    tl.store(emit_ptr + pid, emitted)


def chain_speculative(draft_probs: torch.Tensor, draft_token_ids: torch.Tensor, target_probs: torch.Tensor,
                      out: torch.Tensor, accepted: torch.Tensor, emitted: torch.Tensor, seed, offset,
                      block: int | None = None) -> None:
    """Launch chain speculative verification. draft_probs ``[B, n, V]``, draft_token_ids int ``[B, n]``,
    target_probs ``[B, n+1, V]`` (last dims contiguous); writes out int32 ``[B, n+1]``, accepted and
    emitted int32 ``[B]``. Philox counters: tokens as in `_philox_chunk` from ``offset + b*ceil(V/4)``,
    accept tests ``offset + B*ceil(V/4) + b*n + i``."""
    b, n = draft_token_ids.shape
    vocab = target_probs.shape[-1]
    if b == 0:
        return
    seed_args = _seed_args(seed, offset, out)
    block, warps = launch_config(vocab, b, target_probs.device, block)
    _chain_spec_kernel[(b,)](
        draft_probs, draft_token_ids, target_probs, out, accepted, emitted, *seed_args[:6], n, vocab,
        draft_probs.stride(0), draft_probs.stride(1), draft_token_ids.stride(0), target_probs.stride(0),
        target_probs.stride(1), out.stride(0), SEED_PTR=seed_args[6], N_PAD=triton.next_power_of_2(max(n, 1)),
        BLOCK=block, num_warps=warps)

"""Exact top-k / top-p thresholds without sorting (renorm and mask ops), and the temperature softmax.

Threshold search (one program per row). Floats map to int32 keys that order like the values
(``bits`` for x >= 0, ``bits ^ 0x7FFFFFFF`` for x < 0; NaN is treated as -inf). With
``P(key) = count(x >= key) >= k`` (top-k) or ``mass(x >= key) >= top_p * total`` (top-p), P is
monotone, and the kept set is ``{x >= key*}`` for the LARGEST key* with P true: a value of the row,
so ties at the boundary are all kept (the convention of `pagoda.reference.sampling`).
Invariant over passes: ``P(lo)`` true, ``P(hi)`` false. Each pass evaluates ``NUM_PIVOTS`` pivots
spread over ``(lo, hi)`` at once (a ``[BLOCK, NUM_PIVOTS]`` compare), and also the smallest and
largest key present in ``[lo, hi)``: no key lies between ``lo`` and that minimum (so P is unchanged
there) nor between that maximum and ``hi``, which tightens the interval to the data. The interval
shrinks at least (NUM_PIVOTS + 1)-fold per pass, so 32-bit keys converge within 11 passes; it ends
at ``hi == lo + 1``, i.e. ``lo`` is the exact boundary key. A last pass writes the output. (A numpy
model of this search on softmax rows of 151,936 tokens needs 6-8 passes in all, pass 0 included, for
top-k 50/1000 and top-p 0.9 with 8 pivots; 16 pivots need one pass fewer, 4 pivots one to two more.)

Top-k shortcut (`top_k_floor`, top-k renorm/mask): pass 0 also keeps, per lane (column % BLOCK), the
two largest keys and the largest third key k3 (~5 extra instructions per token). Every untracked key
is <= k3, so if the k-th largest tracked key is above k3 it is the row's k-th key and the pivot passes
are skipped: with 1024 lanes this holds for k up to ~150 on softmax(N(0, 3^2)) rows of 151,936 tokens
(a lane rarely holds three of the top k), making `top_k_floor` one pass instead of 6-8.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels._common import sm_count
from pagoda.kernels.launch.fast import launch, next_pow2

NUM_PIVOTS = 8  # 16 would save about one pass in 6-8 but double the compare work of every pass
MAX_PASSES = 12


@triton.jit
def _ordered_key(x):
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x == x, key, -2139095041)  # NaN -> key of -inf


@triton.jit
def _threshold_kernel(x_ptr, out_ptr, stride_x, stride_o, top_k_ptr, top_p_ptr, rows_ptr, vocab, num_rows,
                      BY_MASS: tl.constexpr, MODE: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr,
                      NUM_PIVOTS: tl.constexpr, PASSES: tl.constexpr):
    """MODE 0: store the row's threshold value (float32, out ``[B]``); 1: renormalised probabilities;
    2: masked logits. HAS_ROWS: program i reads row ``rows[i]`` (clamped to the input)."""
    pid = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        row = tl.minimum(tl.maximum(tl.load(rows_ptr + pid).to(tl.int64), 0), num_rows - 1)
    else:
        row = pid
    base = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK)
    # Pass 0: total mass (probabilities), smallest and largest key; for top-k also each lane's two
    # largest keys and third largest (lane = column % BLOCK; -2^31 marks no entry).
    tot_v = tl.zeros((BLOCK,), tl.float32)
    kmin_v = tl.full((BLOCK,), 2147483647, tl.int32)
    kmax_v = tl.full((BLOCK,), -2147483647, tl.int32)
    t1 = tl.full((BLOCK,), -2147483648, tl.int32)
    t2 = t1
    t3 = t1
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        inb = cols < vocab
        x = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
        key = _ordered_key(x)
        tot_v += tl.where(inb & (x > 0.0), x, 0.0)
        kmin_v = tl.minimum(kmin_v, tl.where(inb, key, 2147483647))
        kmax_v = tl.maximum(kmax_v, tl.where(inb, key, -2147483647))
        if not BY_MASS:
            kk = tl.where(inb, key, -2147483648)
            lo_k = tl.minimum(kk, t1)
            t1 = tl.maximum(kk, t1)
            t3 = tl.maximum(t3, tl.minimum(lo_k, t2))
            t2 = tl.maximum(t2, lo_k)
    total = tl.sum(tot_v, 0)
    kmin = tl.min(kmin_v, 0)
    kmax = tl.max(kmax_v, 0)
    if BY_MASS:
        top_p = tl.load(top_p_ptr + pid).to(tl.float32)
        target = top_p * total
        disabled = top_p >= 1.0
        need = 0
    else:
        need = tl.load(top_k_ptr + pid)
        disabled = (need <= 0) | (need >= vocab)
        target = 0.0
    lo = kmin.to(tl.int64)
    hi = tl.where(disabled, lo + 1, kmax.to(tl.int64) + 1)
    if not BY_MASS:
        # Every untracked key is <= k3, so for t > k3 count(key >= t) is exact from the 2*BLOCK tracked
        # keys: their k-th largest, if above k3, is the row's (one pass; the pivot passes are skipped).
        k3 = tl.max(t3, 0).to(tl.int64)
        c_lo = lo
        c_hi = hi
        for _s in range(32):
            if c_hi - c_lo > 1:
                c_mid = c_lo + (c_hi - c_lo) // 2
                piv1 = c_mid.to(tl.int32)
                cnt1 = tl.sum((t1 >= piv1).to(tl.int32) + (t2 >= piv1).to(tl.int32), 0)
                c_lo = tl.where(cnt1 >= need, c_mid, c_lo)
                c_hi = tl.where(cnt1 >= need, c_hi, c_mid)
        hit = (~disabled) & (c_lo > k3)
        lo = tl.where(hit, c_lo, lo)
        hi = tl.where(hit, c_lo + 1, hi)
    mass_lo = total
    piv_i = tl.arange(0, NUM_PIVOTS).to(tl.int64) + 1
    for _p in range(PASSES):
        if hi - lo > 1:
            # Pivots and keys in int32 (keys of finite floats and +-inf fit); counts and masses are
            # accumulated per lane ([BLOCK, NUM_PIVOTS]) and reduced once after the loop.
            piv = (lo + ((hi - lo) * piv_i) // (NUM_PIVOTS + 1)).to(tl.int32)
            lo32 = lo.to(tl.int32)
            hi32 = hi.to(tl.int32)
            cnt_v = tl.zeros((BLOCK, NUM_PIVOTS), tl.int32)
            mass_v = tl.zeros((BLOCK, NUM_PIVOTS), tl.float32)
            min_v = tl.full((BLOCK,), 2147483647, tl.int32)
            max_v = tl.full((BLOCK,), -2147483647, tl.int32)
            for start in range(0, vocab, BLOCK):
                cols = start + offs
                inb = cols < vocab
                x = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
                key = _ordered_key(x)
                ge = inb[:, None] & (key[:, None] >= piv[None, :])
                cnt_v += ge.to(tl.int32)
                if BY_MASS:
                    mass_v += tl.where(ge & (x[:, None] > 0.0), x[:, None], 0.0)
                inr = inb & (key >= lo32) & (key < hi32)
                min_v = tl.minimum(min_v, tl.where(inr, key, 2147483647))
                max_v = tl.maximum(max_v, tl.where(inr, key, -2147483647))
            cnt = tl.sum(cnt_v, 0)
            mass = tl.sum(mass_v, 0)
            in_min = tl.min(min_v, 0).to(tl.int64)
            in_max = tl.max(max_v, 0).to(tl.int64)
            piv = piv.to(tl.int64)
            if BY_MASS:
                ok = mass >= target
            else:
                ok = cnt >= need
            n_ok = tl.sum(ok.to(tl.int32), 0)  # P is monotone: the first n_ok pivots hold
            piv_lo = tl.max(tl.where(ok, piv, lo), 0)
            mass_piv = tl.sum(tl.where(piv_i == n_ok, mass, 0.0), 0)
            new_hi = tl.min(tl.where(ok, hi, piv), 0)
            # {key >= in_min} == {key >= old lo}: no key lies in [old lo, in_min).
            use_min = in_min >= piv_lo
            mass_lo = tl.where(use_min, mass_lo, tl.where(n_ok > 0, mass_piv, mass_lo))
            lo = tl.where(use_min, in_min, piv_lo)
            hi = tl.minimum(new_hi, in_max + 1)
    keep_from = lo.to(tl.int32)
    if MODE == 1 and not BY_MASS:
        # Top-k tracked counts only (a third of the per-pivot work); its kept mass takes one more pass.
        kept_v = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            inb = cols < vocab
            x = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
            kept_v += tl.where(inb & (_ordered_key(x) >= keep_from) & (x > 0.0), x, 0.0)
        mass_lo = tl.sum(kept_v, 0)
    if MODE == 0:
        # The key back to its float (inverse of _ordered_key): {x >= value} == {key >= lo}.
        value = tl.where(keep_from < 0, keep_from ^ 0x7FFFFFFF, keep_from).to(tl.float32, bitcast=True)
        tl.store(out_ptr + pid, value)
    else:
        # Write pass: keep {key >= lo}.
        out_base = out_ptr + pid * stride_o
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            inb = cols < vocab
            x = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
            keep = _ordered_key(x) >= keep_from
            if MODE == 1:
                y = tl.where(keep & (x > 0.0), x / mass_lo, 0.0)
            else:
                y = tl.where(keep, x, float("-inf"))
            tl.store(out_base + cols, y.to(out_ptr.dtype.element_ty), mask=inb)


def threshold_filter(x: torch.Tensor, out: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                     renorm: bool, block: int | None = None) -> None:
    """x: ``[B, V]`` (last dim contiguous); out: same shape. Exactly one of top_k (int32 ``[B]``) or
    top_p (float32 ``[B]``). renorm=True: kept probabilities divided by their mass, others 0;
    renorm=False: kept logits unchanged, others -inf."""
    _launch_threshold(x, out, top_k, top_p, None, 1 if renorm else 2, x.shape[0], block)


def top_k_floor(x: torch.Tensor, out: torch.Tensor, top_k: torch.Tensor, rows: torch.Tensor | None = None,
                block: int | None = None) -> None:
    """out float32 ``[batch]``: the k-th largest value of row ``rows[i]`` (or row i) of x ``[R, V]``, so
    that ``{x >= out[i]}`` is that row's top-k set (ties kept); rows whose top_k is <= 0 or >= V get
    their minimum. Used as the sampler's floor for "top_k_first" filtering (no renormalised copy)."""
    _launch_threshold(x, out, top_k, None, rows, 0, out.shape[0], block)


def _launch_threshold(x, out, top_k, top_p, rows, mode, batch, block):
    vocab = x.shape[1]
    if batch == 0 or vocab == 0:
        return
    wide = batch < sm_count(x.device)
    warps = None
    if block is None:  # [BLOCK, NUM_PIVOTS] per-lane counters: ~90-120 registers, no spills on sm_90
        block = 1024 if (wide and vocab >= 16384) else 256
        if top_p is None and vocab >= 16384:
            # Top-k: 1024 lanes track 2048 keys, so k up to ~150 resolves in pass 0 (counts only: no
            # mass accumulators, ~70 registers at 8 warps).
            block, warps = 1024, (16 if wide else 8)
    block = min(block, next_pow2(vocab))
    dummy = out
    launch(
        _threshold_kernel, (batch,),
        x, out, x.stride(0), out.stride(0) if mode else 0, top_k if top_k is not None else dummy,
        top_p if top_p is not None else dummy, rows if rows is not None else dummy, vocab, x.shape[0],
        BY_MASS=top_p is not None, MODE=mode, HAS_ROWS=rows is not None,
        BLOCK=block, NUM_PIVOTS=NUM_PIVOTS, PASSES=MAX_PASSES, num_warps=warps or (16 if block >= 1024 else 8))


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, stride_x, stride_o, temp_ptr, vocab,
                    HAS_TEMP: tl.constexpr, BLOCK: tl.constexpr):
    """Two passes: online max/sum (and first argmax), then write. temperature <= 0 -> one-hot argmax."""
    pid = tl.program_id(0).to(tl.int64)
    base = x_ptr + pid * stride_x
    offs = tl.arange(0, BLOCK)
    if HAS_TEMP:
        t = tl.load(temp_ptr + pid).to(tl.float32)
    else:
        t = tl.full((), 1.0, tl.float32)
    greedy = t <= 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    raw_max = tl.full((), float("-inf"), tl.float32)
    amax = tl.zeros((), tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        inb = cols < vocab
        raw = tl.load(base + cols, mask=inb, other=float("-inf")).to(tl.float32)
        x = raw * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.where(m_new == float("-inf"), 1.0, tl.exp(m - m_new))
        e = tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
        s = s * alpha + tl.sum(e, 0)
        m = m_new
        cmax = tl.max(raw, 0)
        cidx = tl.argmax(raw, 0).to(tl.int32) + start
        amax = tl.where(cmax > raw_max, cidx, amax)
        raw_max = tl.maximum(raw_max, cmax)
    out_base = out_ptr + pid * stride_o
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        inb = cols < vocab
        x = tl.load(base + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.where(x == float("-inf"), 0.0, tl.exp(x - m)) / s
        y = tl.where(greedy, (cols == amax).to(tl.float32), p)
        tl.store(out_base + cols, y, mask=inb)


def softmax(x: torch.Tensor, out: torch.Tensor, temperature: torch.Tensor | None, block: int = 1024) -> None:
    """x: ``[B, V]`` logits (fp32/fp16/bf16, last dim contiguous); out float32 ``[B, V]``;
    temperature: float32 ``[B]`` or None (1.0)."""
    batch, vocab = x.shape
    if batch == 0 or vocab == 0:
        return
    launch(_softmax_kernel, (batch,), x, out, x.stride(0), out.stride(0),
           temperature if temperature is not None else out, vocab, HAS_TEMP=temperature is not None,
           BLOCK=min(block, next_pow2(vocab)), num_warps=4)

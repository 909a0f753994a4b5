"""Chain speculative sampling (verification of draft tokens), one program per request, no host sync.

Shares the Philox layout, the exponential race and the launch configuration of `pagoda.kernels.sampling.row`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.launch.fast import launch, next_pow2
from pagoda.kernels.sampling.race import (
    _chunk_row_quads,
    _exp1,
    _philox_chunk,
    _philox_state,
    _race_fold,
    _race_key,
    _race_winner,
)
from pagoda.kernels.sampling.row import _seed_args, launch_config


@triton.jit(do_not_specialize=["seed_stride", "offset_stride", "seed_lo", "seed_hi", "offset_lo", "offset_hi"])
def _chain_spec_kernel(q_ptr, d_ptr, p_ptr, out_ptr, acc_ptr, emit_ptr, seed_ptr, seed_stride, offset_ptr,
                       offset_stride, seed_lo, seed_hi, offset_lo, offset_hi, n_spec, vocab,
                       s_qb, s_qn, s_db, s_pb, s_pn, s_ob,
                       SEED_PTR: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid.to(tl.int64)
    seed, off = _philox_state(pid, seed_ptr, seed_stride, offset_ptr, offset_stride, seed_lo, seed_hi, offset_lo,
                              offset_hi, SEED_PTR)
    # Accept tests, all positions at once: draft token i passes iff u_i * q_i(d_i) < p_i(d_i).
    i = tl.arange(0, N_PAD)
    live = i < n_spec
    tok = tl.load(d_ptr + b * s_db + i, mask=live, other=0)
    tok = tl.minimum(tl.maximum(tok, 0), vocab - 1).to(tl.int64)
    qv = tl.load(q_ptr + b * s_qb + i * s_qn + tok, mask=live, other=0.0).to(tl.float32)
    pv = tl.load(p_ptr + b * s_pb + i * s_pn + tok, mask=live, other=0.0).to(tl.float32)
    # Counters [off, off + B*Vq) draw tokens (Vq = `_chunk_row_quads`); the next B*n draw the accept tests.
    nb = tl.num_programs(0).to(tl.int64)
    vq = _chunk_row_quads(vocab, BLOCK)
    u_test = tl.rand(seed, off + nb * vq + b * n_spec + i)
    passed = live & (u_test * qv < pv)
    accepted = tl.sum(passed.to(tl.int32), 0)
    emitted = tl.min(tl.where(live & ~passed, i, n_spec), 0)
    # Final token: from max(p_e - q_e, 0) after a rejection at e, else the bonus from p_n. A second
    # race over p_e itself is the fallback when the residual is all zero (p_e == q_e).
    has_q = emitted < n_spec
    p_row = p_ptr + b * s_pb + emitted.to(tl.int64) * s_pn
    q_row = q_ptr + b * s_qb + emitted.to(tl.int64) * s_qn
    rng_base = off + b * vq
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
            qr = tl.load(q_row + cols, mask=tl.where(has_q, inb, False), other=0.0).to(tl.float32)
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
    emitted int32 ``[B]``. Philox counters: tokens as in `_philox_chunk` from ``offset + b*Vq``, accept tests
    ``offset + B*Vq + b*n + i``, with ``Vq = ceil(V / BLOCK) * BLOCK / 4`` (`_chunk_row_quads`)."""
    b, n = draft_token_ids.shape
    vocab = target_probs.shape[-1]
    if b == 0:
        return
    seed_args = _seed_args(seed, offset, out)
    block, warps = launch_config(vocab, b, target_probs.device, block)
    launch(
        _chain_spec_kernel, (b,),
        draft_probs, draft_token_ids, target_probs, out, accepted, emitted, *seed_args[:-1], n, vocab,
        draft_probs.stride(0), draft_probs.stride(1), draft_token_ids.stride(0), target_probs.stride(0),
        target_probs.stride(1), out.stride(0), SEED_PTR=seed_args[-1], N_PAD=next_pow2(max(n, 1)),
        BLOCK=block, num_warps=warps)

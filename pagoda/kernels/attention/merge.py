"""Merging partial attention states (cascade / split-KV) by their log-sum-exp.

One program merges the states of one (token, head) row: a running maximum LSE keeps every weight
``2^(s_i - s_max) <= 1`` (online, like the attention softmax), so any number of states merges in one
pass over memory. Empty states (LSE = -inf) contribute weight 0; if every state is empty the row
gets ``v = 0`` and ``s = -inf``. Arithmetic in fp32, output in v's dtype.

The LSEs read and written are natural-log by default; ``base2=True`` (constexpr ``BASE2``) reads and writes
base-2 LSEs as they are (FlashInfer's convention, that of `pagoda.merge_state`), so no conversion is paid.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels._common import LN2_JIT, LOG2E_JIT
from pagoda.kernels.launch.fast import launch, next_pow2


@triton.jit
def _merge_step(m, total, acc, s_i, v_i):
    """Fold one state (base-2 LSE ``s_i``, output ``v_i``) into the running (m, total, acc)."""
    m_new = tl.maximum(m, s_i)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp2(m - m_ref)
    w = tl.exp2(s_i - m_ref)
    return m_new, total * scale + w, acc * scale + w * v_i


@triton.jit
def _merge_states_kernel(V, S, V_B, S_B, O, LSE, MASK, num_states, num_heads, head_dim,
                         stride_vt, stride_vn, stride_vh, stride_st, stride_sn, stride_sh,
                         stride_bt, stride_bh, stride_sbt, stride_sbh,
                         stride_ot, stride_oh, stride_lt, stride_lh,
                         BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, TWO_TENSORS: tl.constexpr,
                         BASE2: tl.constexpr = False):
    # TWO_TENSORS: the states come as two separate tensors (V, S) and (V_B, S_B) (merge_state);
    # otherwise V/S hold num_states states along dimension 1 (merge_states).
    row = tl.program_id(0)
    tok = row // num_heads
    head = (row % num_heads).to(tl.int64)     # 64-bit: v/out may be head-major views
    if HAS_MASK:
        if tl.load(MASK + tok) == 0:
            return
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < head_dim
    v_row = V + tok.to(tl.int64) * stride_vt + head * stride_vh
    s_row = S + tok.to(tl.int64) * stride_st + head * stride_sh
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    to_base2 = 1.0 if BASE2 else LOG2E_JIT   # the running state is base 2 either way
    if TWO_TENSORS:
        s_a = tl.load(s_row).to(tl.float32) * to_base2
        v_a = tl.load(v_row + offs_d, mask=dmask, other=0.0).to(tl.float32)
        s_b = tl.load(S_B + tok.to(tl.int64) * stride_sbt + head * stride_sbh).to(tl.float32) * to_base2
        v_b = tl.load(V_B + tok.to(tl.int64) * stride_bt + head * stride_bh + offs_d, mask=dmask,
                      other=0.0).to(tl.float32)
        m, total, acc = _merge_step(m, total, acc, s_a, v_a)
        m, total, acc = _merge_step(m, total, acc, s_b, v_b)
    else:
        for i in range(0, num_states):
            s_i = tl.load(s_row + i * stride_sn).to(tl.float32) * to_base2
            v_i = tl.load(v_row + i * stride_vn + offs_d, mask=dmask, other=0.0).to(tl.float32)
            m, total, acc = _merge_step(m, total, acc, s_i, v_i)
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)
    lse2 = m + tl.log2(tl.where(empty, 1.0, total))
    lse = tl.where(empty, float("-inf"), lse2 if BASE2 else lse2 * LN2_JIT)
    tl.store(O + tok.to(tl.int64) * stride_ot + head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=dmask)
    tl.store(LSE + tok.to(tl.int64) * stride_lt + head * stride_lh, lse)


def _launch(v, s, v_b, s_b, out, lse, mask, num_states, two, base2):
    seq, heads, dim = out.shape
    if seq * heads == 0:
        return
    if two:
        vs = (v.stride(0), 0, v.stride(1))
        ss = (s.stride(0), 0, s.stride(1))
    else:
        vs, ss = v.stride()[:3], s.stride()
    launch(
        _merge_states_kernel, (seq * heads,),
        v, s, v_b, s_b, out, lse, mask if mask is not None else s, num_states, heads, dim,
        *vs, *ss, v_b.stride(0), v_b.stride(1), s_b.stride(0), s_b.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        BLOCK_D=max(16, next_pow2(dim)), HAS_MASK=mask is not None, TWO_TENSORS=two,
        BASE2=base2, num_warps=4 if dim > 128 else 2)


def merge_states_fwd(v: torch.Tensor, s: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     base2: bool = False) -> None:
    """v ``[seq, states, heads, dim]``, s ``[seq, states, heads]`` -> out ``[seq, heads, dim]``, lse ``[seq,
    heads]``; LSEs in base 2 with ``base2``, natural log otherwise."""
    _launch(v, s, v, s, out, lse, None, v.shape[1], False, base2)


def merge_state_fwd(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None = None,
                    base2: bool = False) -> None:
    """Merge two states ``[seq, heads, dim]`` / ``[seq, heads]`` into out / lse.

    ``out``/``lse`` may alias ``v_a``/``s_a`` (in-place merge): each program reads its row of both
    states before writing it. Rows with ``mask[t] == 0`` are left untouched. LSEs in base 2 with ``base2``.
    """
    _launch(v_a, s_a, v_b, s_b, out, lse, mask, 2, True, base2)

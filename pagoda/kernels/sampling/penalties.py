"""Per-request logits processing in one pass: logit bias / allowed tokens, min_tokens and bad-word bans, and
the repetition, frequency and presence penalties (semantics and layouts: `pagoda.reference.logits`).

Grid ``(rows, cdiv(V, BLOCK_V))``: each program edits one tile of one row in place, reading the row's slot
state for that tile only. A row whose slot has no penalties reads no counts; a slot without a bias row reads
no bias. Bans are found per program from the slot's few stop ids and bad words (``M`` and ``W * L`` values,
compared against the tile), so no second kernel and no scattered writes are needed. No host synchronisation:
the launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import triton
import triton.language as tl

from pagoda.kernels.launch.fast import cdiv, launch

BLOCK_V = 2048


@triton.jit
def _logits_state_kernel(
    LOGITS, stride_row, ROW_SLOTS, V,
    COUNTS, PROMPT, PRES, FREQ, REP,
    ADD, USE_ADD,
    NUM_OUT, MIN_TOK, STOP, BAD, LAST,
    HAS_PEN: tl.constexpr, HAS_ADD: tl.constexpr, M: tl.constexpr, W: tl.constexpr, L: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    slot = tl.load(ROW_SLOTS + row)
    if slot >= 0:
        s = slot.to(tl.int64)
        offs = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        in_row = offs < V
        ptrs = LOGITS + row.to(tl.int64) * stride_row + offs
        x = tl.load(ptrs, mask=in_row, other=0.0)
        if HAS_ADD:
            if tl.load(USE_ADD + s) != 0:
                x += tl.load(ADD + s * V + offs, mask=in_row, other=0.0)
        if M > 0:
            if tl.load(NUM_OUT + s) < tl.load(MIN_TOK + s):
                stops = tl.load(STOP + s * M + tl.arange(0, M))
                hit = tl.sum((offs[:, None] == stops[None, :]).to(tl.int32), axis=1)
                x = tl.where(hit > 0, float("-inf"), x)
        if W > 0:
            cols = tl.arange(0, L)
            words = tl.load(BAD + s * (W * L) + tl.arange(0, W)[:, None] * L + cols[None, :])     # [W, L]
            hist = tl.load(LAST + s * L + cols)                                                 # [L]
            ok = (words == -1) | (words == hist[None, :]) | (cols[None, :] == L - 1)
            matched = tl.min(ok.to(tl.int32), axis=1)                                           # [W]
            last = tl.sum(tl.where(cols[None, :] == L - 1, words, 0), axis=1)                   # [W]
            banned = tl.where((matched > 0) & (last >= 0), last, -1)
            hit = tl.sum((offs[:, None] == banned[None, :]).to(tl.int32), axis=1)
            x = tl.where(hit > 0, float("-inf"), x)
        if HAS_PEN:
            pres = tl.load(PRES + s)
            freq = tl.load(FREQ + s)
            rep = tl.load(REP + s)
            if (pres != 0.0) | (freq != 0.0) | (rep != 1.0):
                c = tl.load(COUNTS + s * V + offs, mask=in_row, other=0)
                seen = (c > 0) | (tl.load(PROMPT + s * V + offs, mask=in_row, other=0) != 0)
                x = tl.where(seen, tl.where(x > 0, x / rep, x * rep), x)
                cf = c.to(tl.float32)
                x = x - freq * cf
                x = x - pres * (c > 0).to(tl.float32)
        tl.store(ptrs, x, mask=in_row)


def logits_state_fwd(logits, row_slots, pen, add, bans) -> None:
    """Launch over ``logits`` float32 ``[B, V]`` (rows contiguous). ``pen``: ``(counts, prompt_mask, presence,
    frequency, repetition)`` or None; ``add``: ``(logit_add, use_add)`` or None; ``bans``: ``(num_output,
    min_tokens, stop_ids, bad_words, last_tokens)`` with any of the last three of width 0 when unused."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    dummy = row_slots
    counts, prompt, pres, freq, rep = pen if pen is not None else (dummy,) * 5
    logit_add, use_add = add if add is not None else (dummy, dummy)
    num_out, min_tok, stop, bad, last = bans
    m = stop.shape[1] if stop is not None else 0
    w = bad.shape[1] if bad is not None else 0
    length = bad.shape[2] if w else 1
    block = min(BLOCK_V, max(16, 1 << (vocab - 1).bit_length()))
    launch(_logits_state_kernel, (rows, cdiv(vocab, block)),
           logits, logits.stride(0), row_slots, vocab,
           counts, prompt, pres, freq, rep, logit_add, use_add,
           num_out if num_out is not None else dummy, min_tok if min_tok is not None else dummy,
           stop if m else dummy, bad if w else dummy, last if w else dummy,
           HAS_PEN=pen is not None, HAS_ADD=add is not None, M=m, W=w, L=length, BLOCK_V=block, num_warps=4)

"""Custom-mask bits of one tile of scores, for the masked paged prefill (`pagoda.kernels.attention.prefill_paged`).

The mask is one bit per score in int32 words, every query row starting at a word boundary (`pagoda.ops._mask`):
key ``t`` of the row at word offset ``row`` is bit ``t % 32`` of ``MASK_WORDS[row + t // 32]``. A tile of
``BLOCK_N`` keys starting at ``start_n`` (a multiple of ``min(BLOCK_N, 32)``) therefore needs ``BLOCK_N / 32``
words per row: each row loads them as scalars of its own (``[BLOCK_M]`` vectors, not a ``[BLOCK_M, BLOCK_N]``
gather), and every score picks its word and shifts: a few integer operations per score, no extra memory traffic
beyond ``BLOCK_M * BLOCK_N / 8`` bytes per tile.
"""
import triton
import triton.language as tl


@triton.jit
def custom_mask_bits(MASK_WORDS, row, row_mask, start_n, offs_n):
    """Bool ``[BLOCK_M, BLOCK_N]``: the mask bits of keys ``start_n + offs_n`` for the rows whose mask rows start
    at word offsets ``row [BLOCK_M]`` (int64); rows with ``row_mask`` False read as hidden."""
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    base = row + (start_n >> 5)
    word = tl.load(MASK_WORDS + base, mask=row_mask, other=0)
    if BLOCK_N <= 32:
        # One word covers the tile (start_n is BLOCK_N-aligned, so the tile does not straddle two words).
        sel = tl.broadcast_to(word[:, None], [word.shape[0], BLOCK_N])
        shift = (start_n & 31) + offs_n
    else:
        sel = tl.broadcast_to(word[:, None], [word.shape[0], BLOCK_N])
        for w in tl.static_range(1, BLOCK_N // 32):
            word_w = tl.load(MASK_WORDS + base + w, mask=row_mask, other=0)
            sel = tl.where((offs_n[None, :] >> 5) == w, word_w[:, None], sel)
        shift = offs_n & 31
    return ((sel >> shift[None, :]) & 1) != 0

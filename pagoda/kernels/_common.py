"""What the kernel families share: base-2 constants, the soft cap and online-softmax step of the Triton attention
kernels, and the SM count (the interpreter test is `pagoda._switches.interpreting`).

Scores are kept in base 2 throughout (``exp2`` is one instruction), so ``log2(e)`` and ``ln(2)`` appear in every
attention kernel. Host code uses the floats `LOG2E` / `LN2`; kernels may read only ``constexpr`` globals, so
``@triton.jit`` and ``@gluon.jit`` code uses `LOG2E_JIT` / `LN2_JIT` (the same values).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634   # log2(e): natural-log quantities times this are base 2
LN2 = 0.6931471805599453     # ln(2): base-2 quantities times this are natural-log
LOG2E_JIT = tl.constexpr(LOG2E)
LN2_JIT = tl.constexpr(LN2)

# The attention kernels' ``HAS_ALIBI`` constexpr names the ALiBi form: False none, True flash-attn's
# ``-slope * |pos_q - pos_k|``, ALIBI_SIGNED FlashInfer's ``slope * (pos_k - pos_q)`` (they differ right of the
# diagonal only, i.e. without a causal mask).
ALIBI_SIGNED = tl.constexpr(2)


def alibi_mode(alibi_slopes, signed: bool):
    """The ``HAS_ALIBI`` value of a launch: False without slopes, ALIBI_SIGNED's value for FlashInfer's form."""
    if alibi_slopes is None:
        return False
    return 2 if signed else True


@functools.cache   # one entry per device, kept for the process (a property query costs µs)
def sm_count(device: torch.device | int | None) -> int:
    """Streaming multiprocessors of a CUDA device (index, torch.device or None for device 0); 1 for a non-CUDA
    ``torch.device`` (the interpreter's grids)."""
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return 1
        device = device.index
    return torch.cuda.get_device_properties(device if device is not None else 0).multi_processor_count


@triton.jit
def soft_cap(qk, qk_scale, softcap_log2):
    """Base-2 scores ``softcap * tanh(scale * qk / softcap) * log2(e)`` of raw products ``qk``, with ``qk_scale =
    scale / softcap`` and ``softcap_log2 = softcap * log2(e)``; tanh through exp2 (no libdevice; exact at +-inf)."""
    return softcap_log2 * (1.0 - 2.0 / (tl.exp2(qk * qk_scale * (2.0 * LOG2E_JIT)) + 1.0))


@triton.jit
def online_softmax(s, m_i, l_i, scale, MASKED: tl.constexpr):
    """One online-softmax step on a tile of base-2 scores ``s [R, BLOCK_N]`` times ``scale`` (1.0 for scores
    already scaled; the raw products' scale otherwise, applied inside the exponent, one FMA per score, valid since
    scale > 0 commutes with the max). Returns ``(p, alpha, m_new, l_new)``: the unnormalised probabilities, the
    factor that rescales the old accumulator, the new running max and sum. MASKED: ``s`` may hold -inf, and a row
    that has seen no visible key keeps m = -inf, so 0 is subtracted instead (2^(-inf - -inf) would be NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    if MASKED:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s * scale - m_sub[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new

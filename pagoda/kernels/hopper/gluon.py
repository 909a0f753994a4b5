"""Gluon for the Hopper attention kernels: the imports (with the shims that let one source compile under Triton
3.6 and 3.9), the device helpers every kernel of the family shares (the online-softmax step on wgmma
accumulators, the key-tile count of a query tile, the shared layout of a TMA box) and the host helpers for
descriptor layouts and the sm_90 test.

``GLUON_OK`` is False when Gluon cannot be imported (it is experimental): the kernels are then absent and every
call takes the Triton kernels (`pagoda.ops._dispatch`).
"""
from __future__ import annotations

import functools

import torch

try:  # Gluon is experimental: any import problem just disables this path.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    # Imported here so that a Triton without any of them disables the family (the kernels import them again).
    from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: F401
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401 - what launch.tma builds
    # Triton 3.6 names the shared-memory view `_reinterpret`; later releases `reinterpret` (3.9 has only
    # that). The kernels call `reinterpret`, so give 3.6 the public name.
    _smem_desc = gl.shared_memory_descriptor
    if not hasattr(_smem_desc, "reinterpret"):
        _smem_desc.reinterpret = _smem_desc._reinterpret
    if not hasattr(gl, "thread_barrier"):  # 3.9 folded it into `barrier`
        gl.thread_barrier = gl.barrier
    if not hasattr(tma, "async_load"):  # 3.6 names of the TMA copies (same arguments)
        tma.async_load = tma.async_copy_global_to_shared
        tma.async_store = tma.async_copy_shared_to_global
    GLUON_OK = True
except Exception:  # pragma: no cover - depends on the installed triton
    GLUON_OK = False


if GLUON_OK:

    @gluon.constexpr_function
    def nvmma_2d(rows, cols, dtype):
        """The 2-D shared layout a TMA-loaded ``[1, rows, cols]`` box is viewed with by wgmma."""
        return gl.NVMMASharedLayout.get_default_for([rows, cols], dtype)

    @gluon.jit
    def softmax_tile(s, m_i, l_i, qk_scale, start_n, mask_from, rows, seqlen_k, shift,
                      CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """Online-softmax step on raw scores ``s [BLOCK_M, BLOCK_N]`` (fp32, wgmma layout).

        Returns p (fp32, unnormalised, base 2), alpha (rescale of the old state), m_new, l_new.
        Tiles starting at or after ``mask_from`` keys may hold invisible keys (causal diagonal, the
        zero-filled tail past seqlen_k): only those pay for the mask.
        """
        if start_n + BLOCK_N > mask_from:
            cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            visible = gl.expand_dims(cols, 0) < seqlen_k
            if CAUSAL:
                visible = visible & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows + shift, 1))
            s = gl.where(visible, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        # A row that has seen no visible key keeps m = -inf: subtract 0 so 2^(-inf - -inf) is not NaN.
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_sub)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_sub, 1))
        l_new = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_new

    @gluon.jit
    def key_tiles(m0, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """(n_tiles, mask_from) of the query tile at row m0: its keys are [0, n_tiles * BLOCK_N) and those
        >= mask_from may be invisible to some row. At least one tile: a tile with no visible key is fully
        masked and yields zeros / LSE -inf."""
        hi = seqlen_k
        mask_from = seqlen_k
        if CAUSAL:
            shift = seqlen_k - seqlen_q
            hi = gl.minimum(hi, m0 + BLOCK_M + shift)
            mask_from = gl.minimum(mask_from, m0 + shift + 1)
        return gl.maximum(gl.cdiv(hi, BLOCK_N), 1), mask_from


GL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"} if GLUON_OK else {}


def gl_dtype(dtype: torch.dtype):
    """Gluon's element type of a float16 / bfloat16 torch dtype."""
    return gl.float16 if dtype == torch.float16 else gl.bfloat16


@functools.cache   # one entry per (box, dtype) in use, kept for the process
def smem_layout(block: tuple, dtype: torch.dtype):
    """The NVMMA shared layout of a TMA box ``block`` of ``dtype`` (host side: descriptors and AOT signatures)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype(dtype))


@functools.cache   # one entry per device, kept for the process (a capability query costs µs)
def is_sm90(device_index: int) -> bool:
    """Whether a CUDA device is sm_90 exactly (the Gluon kernels use Hopper-only wgmma and TMA)."""
    return torch.cuda.get_device_capability(device_index) == (9, 0)

"""Registry of attention backends a user might pick, each prepared outside the timed region.

Every backend takes q ``[b, s_q, h_q, d]`` and k, v ``[b, s_k, h_kv, d]`` (flash-attn layout) and
returns a zero-argument callable that runs its forward pass; layout changes a backend needs (SDPA
wants ``[b, h, s, d]``) happen once at preparation, outside timing. A backend that cannot run here
says why (`unavailable`), and the study reports that reason instead of a figure: nothing is faked.
"""
from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Backend:
    name: str
    describe: str
    unavailable: Callable[[torch.device], str | None]
    prepare: Callable[..., Callable[[], torch.Tensor]]
    compiled: bool = False     # torch.compile'd: timed under `compiled.users_compile`, each row watched


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "needs a CUDA device"


def needs_module(module: str, cuda: bool = True):
    """Every reason the backend cannot run here, joined: the package import first, then the device."""
    def check(device: torch.device) -> str | None:
        reasons = []
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken install raising something else
            reasons.append(f"{module} not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
                           if str(exc) else f"{module} not importable ({type(exc).__name__})")
        if cuda and device.type != "cuda":
            reasons.append("needs a CUDA device")
        return "; ".join(reasons) or None
    return check


def _bhsd(q, k, v):
    return q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


def _prep_eager(q, k, v, causal, scale):
    qt, kt, vt = _bhsd(q, k, v)
    group = qt.shape[1] // kt.shape[1]
    if group > 1:
        kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    sq, sk = qt.shape[2], kt.shape[2]
    mask = None
    if causal:
        i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        mask = torch.arange(sk, device=q.device)[None, :] > i

    def run():
        # What `attn_implementation="eager"` does in HF transformers: fp32 softmax over materialised scores.
        s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(qt.dtype)
        return torch.matmul(p, vt)
    return run


def _sdpa(backend_name: str | None):
    def prep(q, k, v, causal, scale):
        from torch.nn import functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = _bhsd(q, k, v)
        gqa = qt.shape[1] != kt.shape[1]
        if qt.shape[2] != kt.shape[2] and causal:
            raise NotImplementedError("SDPA's is_causal is top-left aligned; unequal lengths not compared")

        def run():
            if backend_name is None:
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
            with sdpa_kernel([getattr(SDPBackend, backend_name)]):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
        run()  # raises here (outside timing) when the forced backend cannot take this case
        return run
    return prep


@functools.cache
def _compiled_flex():
    """``torch.compile(flex_attention)`` once per process, as its users write it; ``fullgraph=True`` so that a
    graph break raises rather than running part of it eagerly (see `pagoda.bench.compiled`)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def _flex_unavailable(device: torch.device) -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as exc:
        return f"this torch has no FlexAttention ({type(exc).__name__})"
    if device.type != "cuda":
        return "needs a CUDA device (the study times FlexAttention compiled by Inductor's CUDA backend)"
    return None


def _prep_flex(q, k, v, causal, scale):
    from torch.nn.attention.flex_attention import create_block_mask

    qt, kt, vt = _bhsd(q, k, v)
    block_mask = None
    if causal:
        shift = kt.shape[2] - qt.shape[2]

        def causal_mod(b, h, qi, kj):
            return kj <= qi + shift
        block_mask = create_block_mask(causal_mod, None, None, qt.shape[2], kt.shape[2], device=q.device)
    compiled = _compiled_flex()
    gqa = qt.shape[1] != kt.shape[1]

    def run():
        return compiled(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return run


def flashinfer_missing(device: torch.device) -> str | None:
    """Why FlashInfer cannot run here (the package and a CUDA device are needed), or None."""
    return needs_module("flashinfer")(device)


def _prep_flash_attn(q, k, v, causal, scale):
    from flash_attn import flash_attn_func
    return lambda: flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)


def _prep_flashinfer(q, k, v, causal, scale):
    import flashinfer

    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
    qo_indptr = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    kv_indptr = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device=q.device)
    wrapper.plan(qo_indptr, kv_indptr, hq, hk, d, causal=causal, sm_scale=scale, q_data_type=q.dtype)
    qf, kf, vf = q.reshape(b * sq, hq, d), k.reshape(b * sk, hk, d), v.reshape(b * sk, hk, d)
    return lambda: wrapper.run(qf, kf, vf)


def _prep_xformers(q, k, v, causal, scale):
    import xformers.ops as xops

    bias = xops.LowerTriangularFromBottomRightMask() if causal else None
    if q.shape[2] != k.shape[2]:
        g = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    return lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)


def _prep_pagoda(q, k, v, causal, scale):
    import pagoda
    return lambda: pagoda.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)


def _cudnn_unavailable(device):
    from torch.nn.attention import SDPBackend

    if not hasattr(SDPBackend, "CUDNN_ATTENTION"):
        return "this torch has no cuDNN SDPA backend"
    if device.type != "cuda":
        return "needs a CUDA device (cuDNN)"
    return None


ATTENTION_BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("eager", "matmul + fp32 softmax + matmul (HF eager)", lambda d: None, _prep_eager),
    Backend("sdpa", "torch SDPA, default dispatch", lambda d: None, _sdpa(None)),
    Backend("sdpa_flash", "torch SDPA forced to FLASH_ATTENTION (FA2)", _needs_cuda, _sdpa("FLASH_ATTENTION")),
    Backend("sdpa_cudnn", "torch SDPA forced to CUDNN_ATTENTION", _cudnn_unavailable, _sdpa("CUDNN_ATTENTION")),
    Backend("sdpa_efficient", "torch SDPA forced to EFFICIENT_ATTENTION", _needs_cuda, _sdpa("EFFICIENT_ATTENTION")),
    Backend("sdpa_math", "torch SDPA forced to MATH", lambda d: None, _sdpa("MATH")),
    Backend("flex", "FlexAttention, torch.compile(fullgraph=True), one graph per shape", _flex_unavailable,
            _prep_flex, compiled=True),
    Backend("flash_attn", "flash-attn package (flash_attn_func)", needs_module("flash_attn"), _prep_flash_attn),
    Backend("flashinfer", "FlashInfer BatchPrefillWithRaggedKVCacheWrapper", needs_module("flashinfer"),
            _prep_flashinfer),
    Backend("xformers", "xformers memory_efficient_attention", needs_module("xformers.ops"), _prep_xformers),
    Backend("pagoda", "pagoda.flash_attn_func (Triton on CUDA, reference on CPU)", lambda d: None, _prep_pagoda),
]}


def attention_flops(batch: int, seqlen_q: int, seqlen_k: int, nheads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs: two matmuls of 2*sq*sk*d each per head; causal counts half (the flash-attn convention)."""
    flops = 4.0 * batch * seqlen_q * seqlen_k * nheads * head_dim
    return flops / 2 if causal else flops


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)

"""Gated activations with FlashInfer's signatures (``flashinfer.activation``): ``silu_and_mul``,
``gelu_and_mul``, ``gelu_tanh_and_mul``.

``out[..., i] = act(input[..., i]) * input[..., d + i]`` for ``input [..., 2 * d]`` (the gate half first, as
the fused gate/up projection of Llama/Qwen/Gemma MLPs lays it out) and ``out [..., d]``; fp16/bf16/fp32, any
leading shape, rows may be strided. On CUDA a Triton kernel runs (`pagoda.kernels.layers.activation`);
elsewhere the reference.

Numerics (fp16/bf16), exactly as `pagoda.reference.activation` states: float32 math, ``act(gate)`` rounded to
the dtype before the product and the product rounded again, as Hugging Face's ``act_fn(gate_proj(x)) *
up_proj(x)`` and vLLM's kernels do. FlashInfer rounds once: results differ from it by at most one unit in
the last place on some elements. FlashInfer also requires ``2 * d * itemsize`` to be a multiple of 16 bytes;
pagoda takes any even last dimension. ``enable_pdl`` is accepted and ignored. No host synchronisation.
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks, _paged, _rows
from pagoda.reference import activation as _ref

__all__ = ["silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _act_and_mul(input, out, enable_pdl, activation: str) -> torch.Tensor:
    _checks.check_tensor("input", input, dtypes=_FLOATS)
    if input.dim() == 0 or input.shape[-1] == 0 or input.shape[-1] % 2:
        raise ValueError(f"input's last dimension must be even and > 0 ([..., 2 * d]), got shape {tuple(input.shape)}")
    if enable_pdl is not None and not isinstance(enable_pdl, bool):
        raise TypeError(f"enable_pdl must be a bool or None, got {type(enable_pdl).__name__}")
    d = input.shape[-1] // 2
    shape = (*input.shape[:-1], d)
    if out is not None:
        _checks.check_tensor("out", out)
        if tuple(out.shape) != shape:
            raise ValueError(f"out must have shape {shape} (input's with the last dimension halved), "
                             f"got {tuple(out.shape)}")
        if out.dtype != input.dtype:
            raise TypeError(f"out must have input's dtype ({input.dtype}), got {out.dtype}")
        if out.device != input.device:
            raise ValueError(f"out must be on input's device ({input.device}), got {out.device}")
        if d > 1 and out.stride(-1) != 1:
            raise ValueError(f"out must be contiguous in its last dimension, got strides {out.stride()}")
    if not _paged.use_triton(input):
        return getattr(_ref, f"{activation}_and_mul")(input, out)
    from pagoda.kernels.layers.activation import act_and_mul_fwd

    x = input if input.stride(-1) == 1 else input.contiguous()
    sx = _rows.row_stride(x)
    if sx is None:
        x = x.contiguous()
        sx = _rows.row_stride(x)
    target = out if out is not None else torch.empty(shape, dtype=input.dtype, device=input.device)
    result, so = target, _rows.row_stride(target)
    if so is None:    # an out whose rows do not step evenly: written through a contiguous buffer
        result = torch.empty(shape, dtype=input.dtype, device=input.device)
        so = _rows.row_stride(result)
    act_and_mul_fwd(x, result, activation, target.numel() // d, d, sx, so)
    if result is not target:
        target.copy_(result)
    return target


def silu_and_mul(input: torch.Tensor, out: torch.Tensor = None, enable_pdl: bool | None = None) -> torch.Tensor:
    """Fused SiLU and multiply: ``silu(input[..., :d]) * input[..., d:]``.

    Args:
        input: ``[..., 2 * d]`` fp16/bf16/fp32 (gate, then up).
        out: optional ``[..., d]`` result tensor of input's dtype (last dimension contiguous); new otherwise.
        enable_pdl: accepted for FlashInfer compatibility, ignored.

    Returns ``out`` ``[..., d]``.
    """
    return _act_and_mul(input, out, enable_pdl, "silu")


def gelu_and_mul(input: torch.Tensor, out: torch.Tensor = None, enable_pdl: bool | None = None) -> torch.Tensor:
    """Fused GELU (exact, erf) and multiply: ``gelu(input[..., :d]) * input[..., d:]``. Arguments as
    `silu_and_mul`."""
    return _act_and_mul(input, out, enable_pdl, "gelu")


def gelu_tanh_and_mul(input: torch.Tensor, out: torch.Tensor = None, enable_pdl: bool | None = None) -> torch.Tensor:
    """Fused tanh-approximated GELU and multiply (HF's ``gelu_pytorch_tanh``, Gemma's MLP):
    ``gelu_tanh(input[..., :d]) * input[..., d:]``. Arguments as `silu_and_mul`."""
    return _act_and_mul(input, out, enable_pdl, "gelu_tanh")

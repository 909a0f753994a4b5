"""RMSNorm with FlashInfer's signatures (``flashinfer.norm``): ``rmsnorm``, ``fused_add_rmsnorm``,
``gemma_rmsnorm``, ``gemma_fused_add_rmsnorm``.

Shapes: ``input [..., hidden]`` (any leading shape; FlashInfer takes 2-D and 3-D), ``weight [hidden]``, all of
one dtype (fp16/bf16/fp32) and device. Rows may be strided (a view into a fused QKV projection is read in
place); the last dimension must be contiguous for tensors written in place (``out``, the fused forms' input
and residual). On CUDA a Triton kernel runs (`pagoda.kernels.layers.norm`); elsewhere the reference.

Numerics (fp16/bf16), exactly as `pagoda.reference.norm` states: statistics and products in float32;
``rmsnorm`` and ``fused_add_rmsnorm`` round where Hugging Face's ``LlamaRMSNorm`` rounds (the normalised row
to the dtype, then ``weight *`` it in the dtype), the ``gemma_`` forms round once after ``* (1 + weight)``
(HF's ``GemmaRMSNorm``, FlashInfer), and the fused forms normalise the rounded ``residual + input`` they store
(HF's residual stream). FlashInfer rounds once and normalises the unrounded sum: results differ from it by at
most one unit in the last place on some elements.

``enable_pdl`` (programmatic dependent launch in FlashInfer) is accepted and ignored. No host synchronisation:
every op can be captured in a CUDA graph.
"""
from __future__ import annotations

import math

import torch

from pagoda.ops import _checks, _paged, _rows
from pagoda.reference import norm as _ref

__all__ = ["rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_pdl(enable_pdl) -> None:
    if enable_pdl is not None and not isinstance(enable_pdl, bool):
        raise TypeError(f"enable_pdl must be a bool or None, got {type(enable_pdl).__name__}")


def _check_input_weight(input, weight, eps, enable_pdl) -> float:
    _checks.check_tensor("input", input, dtypes=_FLOATS)
    if input.dim() == 0 or input.shape[-1] == 0:
        raise ValueError(f"input must have a non-empty last (hidden) dimension, got shape {tuple(input.shape)}")
    _checks.check_tensor("weight", weight, ndim=1, dtypes=_FLOATS)
    if weight.shape[0] != input.shape[-1]:
        raise ValueError(f"weight must have shape (hidden,) = ({input.shape[-1]},), got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have input's dtype ({input.dtype}), got {weight.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight must be on input's device ({input.device}), got {weight.device}")
    _check_pdl(enable_pdl)
    return _check_eps(eps)


def _check_written(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} is written in place and must be contiguous in its last dimension, "
                         f"got strides {t.stride()}")


def _check_like(name: str, t, input: torch.Tensor) -> None:
    """``t`` has input's shape, dtype and device, and a contiguous last dimension."""
    _checks.check_tensor(name, t)
    if t.shape != input.shape:
        raise ValueError(f"{name} must have input's shape {tuple(input.shape)}, got {tuple(t.shape)}")
    if t.dtype != input.dtype:
        raise TypeError(f"{name} must have input's dtype ({input.dtype}), got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{name} must be on input's device ({input.device}), got {t.device}")
    _check_written(name, t)


def _launch(x, weight, out, eps, gemma, residual=None) -> None:
    """The kernel over tensors of one shape, each read or written in place where its layout allows, else
    through a contiguous copy (copied back when written)."""
    from pagoda.kernels.layers.norm import rmsnorm_fwd

    weight = weight if weight.is_contiguous() else weight.contiguous()
    if x.shape[-1] > 1 and x.stride(-1) != 1:         # only a read-only input can get here
        x = x.contiguous()
    tensors = (x, out) if residual is None else (x, out, residual)
    n_rows, inner, strides = _rows.layout(tensors)
    staged = tensors
    if None in strides:
        # The first tensor with two leading strides fits by definition, so the copies leave the split as it was.
        staged = tuple(t if s is not None else t.contiguous() for t, s in zip(tensors, strides, strict=True))
        n_rows, inner, strides = _rows.layout(staged)
    layout = (n_rows, inner, x.shape[-1], strides[0], strides[1], strides[2] if residual is not None else (0, 0))
    rmsnorm_fwd(staged[0], weight, staged[1], eps, gemma, layout, residual=None if residual is None else staged[2])
    for t, s in zip(tensors[1:], staged[1:], strict=True):
        if s is not t:
            t.copy_(s)


def _norm(input, weight, eps, out, enable_pdl, gemma: bool) -> torch.Tensor:
    eps = _check_input_weight(input, weight, eps, enable_pdl)
    if out is not None:
        _check_like("out", out, input)
    if not _paged.use_triton(input):
        return (_ref.gemma_rmsnorm if gemma else _ref.rmsnorm)(input, weight, eps, out)
    if out is None:
        out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    _launch(input, weight, out, eps, gemma)
    return out


def _fused(input, residual, weight, eps, enable_pdl, gemma: bool) -> None:
    eps = _check_input_weight(input, weight, eps, enable_pdl)
    _check_written("input", input)
    _check_like("residual", residual, input)
    if residual.data_ptr() == input.data_ptr() and input.numel() > 0:
        raise ValueError("input and residual must be different tensors (both are written in place)")
    if not _paged.use_triton(input):
        (_ref.gemma_fused_add_rmsnorm if gemma else _ref.fused_add_rmsnorm)(input, residual, weight, eps)
        return
    _launch(input, weight, input, eps, gemma, residual)


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
            enable_pdl: bool | None = None) -> torch.Tensor:
    """Root mean square normalisation: ``out = weight * (input / sqrt(mean(input²) + eps))`` over the last dim.

    Args:
        input: ``[..., hidden]`` fp16/bf16/fp32 (rows may be strided).
        weight: ``[hidden]``, input's dtype.
        eps: added to the mean square.
        out: optional ``[..., hidden]`` result tensor (may be ``input``: in place); a new one otherwise.
        enable_pdl: accepted for FlashInfer compatibility, ignored.

    Returns ``out``. Rounds as HF's ``LlamaRMSNorm`` (module docstring).
    """
    return _norm(input, weight, eps, out, enable_pdl, False)


def gemma_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
                  enable_pdl: bool | None = None) -> torch.Tensor:
    """Gemma's RMSNorm: ``out = (1 + weight) * (input / sqrt(mean(input²) + eps))``, one rounding at the end.
    Arguments as `rmsnorm`."""
    return _norm(input, weight, eps, out, enable_pdl, True)


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      enable_pdl: bool | None = None) -> None:
    """Residual add and RMSNorm in place: ``residual += input``, then ``input = rmsnorm(residual, weight, eps)``.

    Args:
        input: ``[..., hidden]`` fp16/bf16/fp32, last dimension contiguous; overwritten by the normalised rows.
        residual: same shape, dtype and device; overwritten by ``residual + input`` (rounded to the dtype).
        weight: ``[hidden]``; eps, enable_pdl: as in `rmsnorm`.

    Returns None (as FlashInfer). The rounded sum is what is normalised (HF's numerics, module docstring).
    """
    _fused(input, residual, weight, eps, enable_pdl, False)


def gemma_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                            enable_pdl: bool | None = None) -> None:
    """`fused_add_rmsnorm` with Gemma's ``(1 + weight)`` and one rounding of the normalised row."""
    _fused(input, residual, weight, eps, enable_pdl, True)

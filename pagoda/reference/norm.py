"""RMSNorm in plain PyTorch: the CPU path of `pagoda.ops.norm` and the test oracle.

Rounding (what the kernels do too; fp16/bf16 inputs, fp32 has nothing to round):

- ``rmsnorm`` / ``fused_add_rmsnorm`` round as Hugging Face's ``LlamaRMSNorm`` (and Qwen2/Qwen3/Mistral's):
  ``x̂ = x.float() * rsqrt(mean(x.float()²) + eps)`` rounded to the input dtype, then ``weight * x̂`` in that
  dtype (one more rounding). FlashInfer rounds once, after ``x̂ * weight`` in float32; the two differ by at
  most one unit in the last place on some elements.
- ``gemma_rmsnorm`` / ``gemma_fused_add_rmsnorm`` round once, ``(x̂ * (1 + weight)).to(dtype)`` in float32, as
  HF's ``GemmaRMSNorm`` and FlashInfer do.
- The fused forms first store ``residual + input`` rounded to the dtype (as HF's residual stream does) and
  normalise that stored value; FlashInfer normalises the unrounded float32 sum.

``compute_dtype=torch.float64`` (the oracle) does all the arithmetic in float64 with no intermediate rounding
and returns float64 results.
"""
from __future__ import annotations

import torch

__all__ = ["rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm", "rmsnorm_ref",
           "fused_add_rmsnorm_ref"]


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False,
                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RMSNorm of ``x [..., hidden]`` over its last dimension with ``weight [hidden]`` (``1 + weight`` when
    ``gemma``). float32: the rounding of the module docstring, result in ``x.dtype``; float64: exact, float64."""
    xc = x.to(compute_dtype)
    normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if compute_dtype == torch.float64:
        w = weight.to(torch.float64)
        return normed * (1.0 + w if gemma else w)
    if gemma:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return (weight * normed.to(x.dtype)).to(x.dtype)


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                          gemma: bool = False, compute_dtype: torch.dtype = torch.float32
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)``: ``new_residual = residual + x`` (rounded to the dtype unless float64),
    ``normed = rmsnorm_ref(new_residual, weight, eps, gemma)``. Inputs are not modified."""
    total = residual.to(compute_dtype) + x.to(compute_dtype)
    if compute_dtype != torch.float64:
        total = total.to(x.dtype)
    return rmsnorm_ref(total, weight, eps, gemma, compute_dtype), total


def _norm_into(input, weight, eps, out, gemma):
    result = rmsnorm_ref(input, weight, eps, gemma)
    if out is None:
        return result
    out.copy_(result)
    return out


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
            enable_pdl: bool | None = None) -> torch.Tensor:
    """``weight * (input / RMS(input))`` over the last dimension (HF Llama rounding); into ``out`` if given."""
    return _norm_into(input, weight, eps, out, False)


def gemma_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
                  enable_pdl: bool | None = None) -> torch.Tensor:
    """``(1 + weight) * (input / RMS(input))`` (one rounding); into ``out`` if given."""
    return _norm_into(input, weight, eps, out, True)


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      enable_pdl: bool | None = None) -> None:
    """In place: ``residual += input``, then ``input = rmsnorm(residual, weight, eps)``."""
    normed, total = fused_add_rmsnorm_ref(input, residual, weight, eps, False)
    residual.copy_(total)
    input.copy_(normed)


def gemma_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                            enable_pdl: bool | None = None) -> None:
    """In place: ``residual += input``, then ``input = gemma_rmsnorm(residual, weight, eps)``."""
    normed, total = fused_add_rmsnorm_ref(input, residual, weight, eps, True)
    residual.copy_(total)
    input.copy_(normed)

"""RMSNorm, with the fused "add the residual, then normalise" form the decoder layers chain.

On a GPU pagoda's fused kernels run (`pagoda.ops.rmsnorm`, `pagoda.ops.fused_add_rmsnorm`: one pass over
the rows, the residual add in the same kernel, graph-capturable). Elsewhere plain PyTorch. Both round as
Hugging Face's Llama/Qwen/Mistral do: the variance in float32, the normalised value cast back to the
input dtype before the weight multiplies it, and the fused form normalises the rounded ``x + residual``.
"""
from __future__ import annotations

import torch
from torch import nn

from pagoda.ops import fused_add_rmsnorm, rmsnorm

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension (``hidden_size``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x ``[..., hidden_size]`` -> normalised x. With ``residual`` (same shape): ``s = x + residual``,
        returns ``(norm(s), s)``, the new residual stream being ``s``. On a GPU the fused form works in
        place: ``x`` is overwritten by ``norm(s)`` and ``residual`` by ``s`` (both returned)."""
        if x.is_cuda and x.dtype == self.weight.dtype:
            if residual is None:
                return rmsnorm(x, self.weight, self.eps)
            if x.stride(-1) == 1 and residual.stride(-1) == 1 and residual.shape == x.shape:
                fused_add_rmsnorm(x, residual, self.weight, self.eps)
                return x, residual
        if residual is None:
            return self._norm(x)
        s = x + residual
        return self._norm(s), s

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

"""RMSNorm, with the fused "add the residual, then normalise" form the decoder layers chain.

Plain PyTorch: the variance is taken in float32 and the normalised value is cast back to the input
dtype before the weight multiplies it, in the order Hugging Face's Llama/Qwen/Mistral do it, so
low-precision outputs round the same way.
"""
from __future__ import annotations

import torch
from torch import nn

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
        returns ``(norm(s), s)``, the new residual stream being ``s``."""
        if residual is None:
            return self._norm(x)
        s = x + residual
        return self._norm(s), s

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

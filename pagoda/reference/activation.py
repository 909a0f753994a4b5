"""Gated activations in plain PyTorch: the CPU path of `pagoda.ops.activation` and the test oracle.

``act_and_mul(x)[..., i] = act(x[..., i]) * x[..., d + i]`` for ``x [..., 2 * d]`` (gate first, up second).

Rounding for fp16/bf16 (what the kernels do too): ``act(gate)`` is computed in float32 and rounded to the
dtype, then multiplied by ``up`` and rounded again, as Hugging Face's MLPs (``act_fn(gate_proj(x)) *
up_proj(x)``) and vLLM's kernels do. FlashInfer rounds once, after the product in float32; the two differ by
at most one unit in the last place on some elements. ``compute_dtype=torch.float64`` (the oracle): float64
throughout, no intermediate rounding, float64 result.

Activations: ``silu(g) = g * sigmoid(g)``; ``gelu(g) = g * Φ(g)`` (exact, erf); ``gelu_tanh(g) = g * 0.5 *
(1 + tanh(sqrt(2/π) * (g + 0.044715 g³)))`` (PyTorch's ``approximate="tanh"``, HF's ``gelu_pytorch_tanh``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul", "act_and_mul_ref", "ACTIVATIONS"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _act(name: str, g: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(g)
    if name == "gelu":
        return F.gelu(g)
    if name == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def act_and_mul_ref(x: torch.Tensor, activation: str, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``act(x[..., :d]) * x[..., d:]`` for ``x [..., 2 * d]``. float32: rounded as the module docstring says,
    result in ``x.dtype``; float64: exact, float64."""
    d = x.shape[-1] // 2
    gate, up = x[..., :d].to(compute_dtype), x[..., d:].to(compute_dtype)
    act = _act(activation, gate)
    if compute_dtype == torch.float64:
        return act * up
    return (act.to(x.dtype).float() * up).to(x.dtype)


def _into(input, out, activation):
    result = act_and_mul_ref(input, activation)
    if out is None:
        return result
    out.copy_(result)
    return out


def silu_and_mul(input: torch.Tensor, out: torch.Tensor = None, enable_pdl: bool | None = None) -> torch.Tensor:
    """``silu(input[..., :d]) * input[..., d:]`` (``[..., 2d]`` -> ``[..., d]``); into ``out`` if given."""
    return _into(input, out, "silu")


def gelu_and_mul(input: torch.Tensor, out: torch.Tensor = None, enable_pdl: bool | None = None) -> torch.Tensor:
    """``gelu(input[..., :d]) * input[..., d:]`` (erf GELU); into ``out`` if given."""
    return _into(input, out, "gelu")


def gelu_tanh_and_mul(input: torch.Tensor, out: torch.Tensor = None, enable_pdl: bool | None = None) -> torch.Tensor:
    """``gelu_tanh(input[..., :d]) * input[..., d:]`` (tanh-approximated GELU); into ``out`` if given."""
    return _into(input, out, "gelu_tanh")

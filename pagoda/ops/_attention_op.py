"""The attention forward as a torch custom op, so that torch.compile treats the Triton launch as one
opaque call (HF's static-cache generate compiles the model forward; without this, Inductor re-traces
the Triton kernel itself and rejects it). The op writes into ``out`` / ``lse`` in place.

Outside torch.compile/export tracing, `attention_fwd_op` launches the kernel directly: a call through
the custom op's dispatcher entry costs ~70-90 µs of host time under ``torch.no_grad()`` (its Python
autograd and ADInplaceOrView kernels run even then), more than the launch itself, and HF ``generate``
makes one call per layer per token. The two paths run the same code on the same arguments.

No ``from __future__ import annotations`` here: torch.library reads the annotations as types.
"""
from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, batch_size, softmax_scale,
            window_left, window_right, softcap):
    from pagoda.ops._dispatch import attention_fwd

    attention_fwd(q, k, v, out, lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                  batch_size=batch_size, softmax_scale=softmax_scale, window_left=window_left,
                  window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes)


@torch.library.custom_op("pagoda::attention_fwd", mutates_args=("out", "lse"))
def attention_fwd_custom_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            lse: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                            cu_seqlens_k: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
                            max_seqlen_q: int, batch_size: int, softmax_scale: float, window_left: int,
                            window_right: int, softcap: float) -> None:
    """`pagoda.kernels.attention.fwd.attention_fwd` (shapes there); arguments already validated."""
    _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, batch_size, softmax_scale,
            window_left, window_right, softcap)


def attention_fwd_op(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, batch_size,
                     softmax_scale, window_left, window_right, softcap) -> None:
    """Run `attention_fwd_custom_op` (same arguments): through the op under torch.compile / export or any
    tracing dispatch mode (fake, functional or proxy tensors), as a direct launch otherwise."""
    if torch.compiler.is_compiling() or type(q) is not torch.Tensor or _get_current_dispatch_mode() is not None:
        attention_fwd_custom_op(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q,
                                batch_size, softmax_scale, window_left, window_right, softcap)
    else:
        _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, batch_size,
                softmax_scale, window_left, window_right, softcap)

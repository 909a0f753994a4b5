"""The forward context: per-step attention metadata that every attention layer of the model reads.

The engine builds one `ForwardContext` per step (page table, token positions, the planned wrapper) and
sets it around the model call; the layers read it instead of taking it through every ``forward``
signature, as vLLM and nano-vLLM do.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor

__all__ = ["ForwardContext", "set_forward_context", "get_forward_context", "forward_context"]


@dataclass(slots=True)
class ForwardContext:
    """Attention metadata of one model step (all tensors on the model's device).

    Attributes:
        wrapper: a pagoda ``BatchPrefillWithPagedKVCacheWrapper`` (steps with prefill tokens) or
            ``BatchDecodeWithPagedKVCacheWrapper`` (decode-only steps), planned once for the step with
            ``causal=True`` and the model's ``attn_plan_kwargs``; every layer calls its ``run``.
        batch_indices: int32 ``[num_tokens]``, the request (row of the page table) of each token.
        positions: int32 ``[num_tokens]``, each token's position in its sequence: its KV slot and
            its RoPE angle.
        kv_indices: int32 ``[total_pages]``, CSR page ids of the step *after* this step's append.
        kv_indptr: int32 ``[num_reqs + 1]``.
        kv_last_page_len: int32 ``[num_reqs]``.
        validate: check the metadata's values against each other in the KV append (reads them on the
            host: a sync per layer on a GPU). A serving engine that built them itself passes False, and
            only shapes and dtypes are checked.
    """

    wrapper: object
    batch_indices: Tensor
    positions: Tensor
    kv_indices: Tensor
    kv_indptr: Tensor
    kv_last_page_len: Tensor
    validate: bool = True


# The running step's context: set by the engine (through `forward_context`) around each model call and
# read by every attention layer during it; None between steps. One model call runs at a time per process.
_CONTEXT: ForwardContext | None = None


def set_forward_context(ctx: ForwardContext | None) -> None:
    """Set (or clear, with None) the context the attention layers read."""
    global _CONTEXT
    if ctx is not None and not isinstance(ctx, ForwardContext):
        raise TypeError(f"ctx must be a ForwardContext or None, got {type(ctx).__name__}")
    _CONTEXT = ctx


def get_forward_context() -> ForwardContext:
    """The running step's context; RuntimeError when none is set."""
    if _CONTEXT is None:
        raise RuntimeError("no ForwardContext is set: run the model inside `with forward_context(ctx):`")
    return _CONTEXT


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Set ``ctx`` for the duration of the block and clear it afterwards (also on error)."""
    set_forward_context(ctx)
    try:
        yield ctx
    finally:
        set_forward_context(None)

"""Decode over a contiguous per-sequence KV cache, with the least host work: the hot path of HF
``generate`` (`pagoda.integrations.transformers`), one call per layer per token.

q ``[batch, num_qo_heads, head_dim]`` attends every key of its own row of k/v ``[batch, seqlen, num_kv_heads,
head_dim]`` (any strides with a contiguous last dimension, e.g. HF's ``[b, h, s, d]`` cache transposed, or
the filled slice of a static cache). The rows are handed to the split-KV decode kernel as one page per
sequence (``page_size = seqlen``), as `flash_attn_with_kvcache` does, but without its appends, rotary,
per-call argument scan or host syncs: the page table for ``(batch, seqlen)`` is built once and reused by
every layer of the step, and the caller is trusted for the checks below (shapes, dtypes, devices, GQA
ratio). GQA: the query heads that share a KV head are computed together, so each key is read once.
The split workspace and merge tickets are shared by all calls of one shape on a device: calls are assumed
to run on one stream (HF generate does), as with one FlashInfer wrapper.
"""
from __future__ import annotations

import torch

from pagoda.ops import _decode_plan as _plan
from pagoda.ops import _paged

_meta_cache: dict = {}       # (device, batch, seqlen, num_kv_heads, num_qo_heads, head_dim) -> launch metadata
_bound: dict = {}            # everything the launch arguments depend on -> (recorded launches, tensor slots)
_MAX_BOUND = 64


def _metadata(device, b, s, hk, hq, d):
    key = (device, b, s, hk, hq, d)
    meta = _meta_cache.get(key)
    if meta is None:
        if len(_meta_cache) > 8:
            _meta_cache.clear()
        chunk, splits = _plan.choose_chunk(s, b, hk, _plan.num_sms(device), 1, None, False, _plan.MAX_SPLITS)
        ws = torch.empty(max(splits, 1) * b * hq * (d + 1), dtype=torch.float32, device=device)
        o_part, lse_part = _plan.workspace_views(ws, b, splits, hq, d)
        meta = _meta_cache[key] = (
            torch.arange(b + 1, dtype=torch.int32, device=device),            # kv_indptr: one page each
            torch.arange(b, dtype=torch.int32, device=device),                # kv_indices
            torch.full((b,), s, dtype=torch.int32, device=device),            # kv_last_page_len = seqlen
            torch.full((1,), max(chunk, 1), dtype=torch.int32, device=device), splits, o_part, lse_part,
            torch.empty(b, hq, dtype=torch.float32, device=device),           # LSE: written, never read
            torch.zeros(b * hk, dtype=torch.int32, device=device))            # split merge tickets (left 0)
    return meta


def decode_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """``out [batch, num_qo_heads, head_dim]`` = softmax(q kᵀ · scale) v over all ``seqlen`` keys of each row.

    Preconditions (not checked, the caller's): q, k, v on one device with one dtype; ``k.shape == v.shape``;
    ``num_qo_heads % num_kv_heads == 0``; last dimensions contiguous; head_dim a multiple of 8 up to 256.
    Takes the reference path where `pagoda.ops._paged.use_triton` says so (CPU)."""
    b, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    if s == 0 or b == 0:
        return torch.zeros_like(q)
    if not _paged.use_triton(q):
        from pagoda.reference.attention import flash_attn_func as ref

        return ref(q[:, None], k, v, softmax_scale=softmax_scale)[:, 0].to(q.dtype)
    from pagoda.kernels import _launch

    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    # Replay key: every value the launch arguments are computed from (the scale is a kernel argument, the
    # 16-byte alignment of each tensor is part of Triton's specialisation).
    key = (q.device, q.dtype, b, s, hk, hq, d, q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3],
           q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15, softmax_scale)
    from pagoda.kernels import decode as _kdecode

    indptr, indices, last, chunk, splits, o_part, lse_part, lse, counters = _metadata(q.device, b, s, hk, hq, d)

    def launch_fn():
        _kdecode.decode_fwd(q, k, v, (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2)),
                            indptr, indices, last, s, hk, out, lse, chunk=chunk, num_splits=splits, o_part=o_part,
                            lse_part=lse_part, sm_scale=float(softmax_scale), counters=counters)

    # HF's dynamic cache makes new k/v tensors every step: the bound launches do not keep them.
    _launch.replay_or_record(_bound, key, (q, k, v, out), launch_fn,
                             1 + (splits > 0 and not _kdecode.merge_is_fused(splits, True)), _MAX_BOUND)
    return out

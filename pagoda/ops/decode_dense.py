"""Decode over a contiguous per-sequence KV cache, with the least host work: the hot path of HF
``generate`` (`pagoda.integrations.transformers`), one call per layer per token.

q ``[batch, num_qo_heads, head_dim]`` attends every key of its own row of k/v ``[batch, seqlen, num_kv_heads,
head_dim]`` (any strides with a contiguous last dimension, e.g. HF's ``[b, h, s, d]`` cache transposed, or
the filled slice of a static cache). The rows are handed to the split-KV decode kernel as one page per
sequence, as `flash_attn_with_kvcache` does (``page_size`` = seqlen rounded up to a power of two, `page_for`:
the kernel then gathers keys with a shift and runs whole tiles unmasked), but without its appends, rotary,
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

# Process-wide caches of the dense decode path, each emptied when it reaches its limit (`_cached`: 16 entries;
# `_bound` / `_hf`: _MAX_BOUND), so a long-running server that sees many shapes keeps a bounded set.
_static_cache: dict = {}     # (device, batch, num_kv_heads, num_qo_heads) -> per-batch metadata
_len_cache: dict = {}        # (device, batch, seqlen) -> kv_last_page_len
_chunk_cache: dict = {}      # (device, chunk) -> chunk tensor
_ws_cache: dict = {}         # (device, splits, batch, num_qo_heads, head_dim) -> (o_part, lse_part)
_bound: dict = {}            # everything the launch arguments depend on -> bound launches
_hf: dict = {}               # HF-layout call key -> (bound launches, out shape, device, the _launch module)
_MAX_BOUND = 64


def _cached(cache: dict, key, make, limit: int = 16):
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= limit:
            cache.clear()
        hit = cache[key] = make()
    return hit


def page_for(s: int) -> int:
    """The page size of a row of ``s`` keys: one page per row, any size >= s gives the same addresses (the
    row's length is its last page's length), and a power of two takes the decode kernel's fast key loop
    (`pagoda.kernels.attention.decode.whole_tiles`; an H200 measured a non-power-of-two page at 359 us against 262).
    ``s >= 1``."""
    from pagoda.kernels.launch.fast import next_pow2

    return next_pow2(s)


def _metadata(device, b, s, hk, hq, d):
    """Launch metadata of (batch, seqlen): the per-batch tensors are made once, a new seqlen (every decode
    step of HF's growing cache) costs one small fill (kv_last_page_len), a new split plan its chunk tensor."""
    indptr, indices, lse, counters = _cached(_static_cache, (device, b, hk, hq), lambda: (
        torch.arange(b + 1, dtype=torch.int32, device=device),            # kv_indptr: one page each
        torch.arange(b, dtype=torch.int32, device=device),                # kv_indices
        torch.empty(b, hq, dtype=torch.float32, device=device),           # LSE: written, never read
        torch.zeros(b * hk, dtype=torch.int32, device=device)))           # split merge tickets (left 0)
    last = _cached(_len_cache, (device, b, s),
                   lambda: torch.full((b,), s, dtype=torch.int32, device=device))   # kv_last_page_len = seqlen
    chunk, splits = _plan.choose_chunk(s, b, hk, _plan.num_sms(device), 1, None, False, _plan.MAX_SPLITS)
    chunk_t = _cached(_chunk_cache, (device, max(chunk, 1)),
                      lambda: torch.full((1,), max(chunk, 1), dtype=torch.int32, device=device))
    o_part, lse_part = _cached(_ws_cache, (device, splits, b, hq, d), lambda: _plan.workspace_views(
        torch.empty(max(splits, 1) * b * hq * (d + 1), dtype=torch.float32, device=device), b, splits, hq, d), 4)
    return indptr, indices, last, chunk_t, splits, o_part, lse_part, lse, counters


def _launch_fn(q, k, v, out, softmax_scale):
    """The launches of one call (q ``[b, hq, d]``, k/v ``[b, s, hk, d]`` views, out ``[b, hq, d]``) and
    how many there are."""
    from pagoda.kernels.attention import decode as _kdecode

    b, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    indptr, indices, last, chunk, splits, o_part, lse_part, lse, counters = _metadata(q.device, b, s, hk, hq, d)

    def launch_fn():
        _kdecode.decode_fwd(q, k, v, (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2)),
                            indptr, indices, last, page_for(s), hk, out, lse, chunk=chunk, num_splits=splits,
                            o_part=o_part, lse_part=lse_part, sm_scale=float(softmax_scale), counters=counters)

    return launch_fn, 1 + (splits > 0 and not _kdecode.merge_is_fused(splits, True))


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
    from pagoda.kernels.launch import fast as _launch

    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    # Replay key: every value the launch arguments are computed from (the scale is a kernel argument, the
    # 16-byte alignment of each tensor is part of Triton's specialisation).
    key = (q.device, q.dtype, b, s, hk, hq, d, q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3],
           q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15, softmax_scale)
    hit = _bound.get(key)
    if hit is None or not _launch.replay(hit, (q, k, v, out)):
        launch_fn, n = _launch_fn(q, k, v, out, softmax_scale)
        # HF's dynamic cache makes new k/v tensors every step: the bound launches do not keep them.
        _launch.replay_or_record(_bound, key, (q, k, v, out), launch_fn, n, _MAX_BOUND)
    return out


# (device, batch, kv heads, qo heads, head_dim, chunk, splits) -> metadata that captured graphs point into: never
# freed; past _MAX_GRAPH_META shapes new calls build theirs per call instead.
_graph_meta: dict = {}
_MAX_GRAPH_META = 64


def _outside_graph_pools(make, device: torch.device):
    """``make()`` on a helper thread, then synchronised: its tensors come from the ordinary caching allocator
    even while this thread allocates from a CUDA-graph pool (Inductor's cudagraph trees route a thread's
    allocations to their pool while they warm a graph up; a tensor kept from there would sit in memory that
    another graph of the tree reuses)."""
    box: list = []

    def run():
        try:
            with torch.cuda.device(device):
                box.append(make())
                torch.cuda.synchronize(device)
        except BaseException as exc:  # handed to the caller
            box.append(exc)

    import threading

    worker = threading.Thread(target=run, name="pagoda-graph-safe-alloc")
    worker.start()
    worker.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _graph_safe_metadata(device, b, s, hk, hq, d):
    """`_metadata` for calls that CUDA graphs capture (`decode_dense_masked`, HF's compiled decode step): a
    graph keeps the addresses of these tensors, so they are never freed, and they are made outside any graph
    pool. Inside a capture (nothing kept yet) or past ``_MAX_GRAPH_META`` shapes they are made per call: the
    graph then owns them (its memory, its captured fills). Keyed by the split plan, not the length: a cache
    that grows under torch.compile without CUDA graphs makes a new entry only when its plan changes.
    Returns (kv_indptr, kv_indices, chunk, o_part, lse_part, lse, counters, splits)."""
    chunk, splits = _plan.choose_chunk(s, b, hk, _plan.num_sms(device), 1, None, False, _plan.MAX_SPLITS)
    key = (device, b, hk, hq, d, chunk, splits)
    hit = _graph_meta.get(key)
    if hit is not None:
        return hit

    def make():
        indptr = torch.arange(b + 1, dtype=torch.int32, device=device)                # one page per row
        work = torch.empty(max(splits, 1) * b * hq * (d + 1), dtype=torch.float32, device=device)
        return (indptr, indptr[:b], torch.full((1,), max(chunk, 1), dtype=torch.int32, device=device),
                *_plan.workspace_views(work, b, splits, hq, d),
                torch.empty(b, hq, dtype=torch.float32, device=device),              # LSE: written, never read
                torch.zeros(b * hk, dtype=torch.int32, device=device), splits)        # merge tickets (left 0)

    if device.type != "cuda":
        return make()
    if torch.cuda.is_current_stream_capturing() or len(_graph_meta) >= _MAX_GRAPH_META:
        return make()
    hit = _graph_meta[key] = _outside_graph_pools(make, device)
    return hit


def decode_dense_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                        key_mask: torch.Tensor | None, kv_len: torch.Tensor, softcap: float = 0.0,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_dense` with the visible keys given on the device, so that nothing is read back to the host
    (capturable in a CUDA graph): row ``b`` attends its keys ``t < kv_len[b]`` where ``key_mask[b, t]`` is
    nonzero. kv_len int32 ``[batch]`` (at most ``seqlen``; keys past it are not read), key_mask None or
    bool/uint8 ``[batch, >= seqlen]`` (any strides); ``softcap > 0``: tanh soft-capping. A row that sees no
    key gets zeros. Same preconditions as `decode_dense` (the caller's); returns ``[batch, num_qo_heads,
    head_dim]``, written into ``out`` when given (a view of that shape, last dimension contiguous)."""
    b, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    if s == 0 or b == 0 or not _paged.use_triton(q):
        from pagoda.reference.decode import decode_masked

        res = torch.zeros_like(q) if s == 0 or b == 0 else decode_masked(
            q, k, v, key_mask, kv_len, sm_scale=softmax_scale, logits_soft_cap=softcap)
        return res if out is None else out.copy_(res)
    from pagoda.kernels.attention import decode as _kdecode

    q = q if q.stride(-1) == 1 else q.contiguous()
    kv_len = kv_len.contiguous()             # the kernel reads kv_len[b] at unit stride
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    indptr, indices, chunk, o_part, lse_part, lse, counters, splits = _graph_safe_metadata(q.device, b, s, hk, hq, d)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device) if out is None else out
    # One page per row (`page_for(s)` slots): the row's KV length is its last page's length, read on the device.
    _kdecode.decode_fwd(q, k, v, (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2)),
                        indptr, indices, kv_len, page_for(s), hk, out, lse, chunk=chunk, num_splits=splits,
                        o_part=o_part, lse_part=lse_part, sm_scale=float(softmax_scale), logits_soft_cap=float(softcap),
                        counters=counters, key_mask=key_mask)
    return out


# The current CUDA device index and raw stream, without torch.cuda's Python wrappers (a hit of `decode_hf`
# holds CUDA tensors, so CUDA is initialised); the wrappers where this build lacks the C functions.
_current_device = getattr(torch._C, "_cuda_getDevice", None) or (lambda: torch.cuda.current_device())
_current_stream = (getattr(torch._C, "_cuda_getCurrentRawStream", None)
                   or (lambda index: torch.cuda.current_stream(index).cuda_stream))


def kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_qo_heads: int, num_kv_heads: int) -> bool:
    """Whether the decode kernel takes these q/k/v (head_dim last, any layout otherwise): fp16/bf16 of one
    dtype, head_dim a multiple of 8 up to 256 (the same for all three), a whole GQA ratio, last dimensions
    contiguous. The rest (one device, k and v alike) is what HF guarantees."""
    d = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
            and d % 8 == 0 and d <= 256 and k.shape[-1] == d and v.shape == k.shape
            and num_qo_heads % num_kv_heads == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1)


def _hf_key(query, key, value, scaling):
    return (query.shape, key.shape, value.shape, query.stride(), key.stride(), value.stride(), query.dtype,
            key.dtype, value.dtype, query.get_device(), scaling)


def decode_hf(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Decode in Hugging Face's layout: ``out [batch, 1, num_qo_heads, head_dim]`` (what an HF attention
    function returns) for query ``[batch, num_qo_heads, 1, head_dim]`` and key/value ``[batch, num_kv_heads,
    seqlen, head_dim]`` (any strides, last dim contiguous); ``scaling`` None means ``head_dim ** -0.5``.
    Returns None when the decode kernel does not apply (dtype, head_dim, GQA ratio, strides): the caller
    takes its general path.

    The per-layer hot path of HF ``generate``: a call whose shapes, strides, dtypes, device and scale were
    seen before (every layer after the first of a decode step) and whose tensors are 16-byte aligned issues
    the recorded launches with only query, key, value and the output swapped: no views, no argument
    rebuild, Triton's C launcher called directly (`pagoda.kernels.launch.fast.Bound`)."""
    hk_key = _hf_key(query, key, value, scaling)
    hit = _hf.get(hk_key)
    if hit is not None and not ((query.data_ptr() | key.data_ptr() | value.data_ptr()) & 15):
        bound, shape, device, launch = hit
        out = torch.empty(shape, dtype=query.dtype, device=device)
        # The device is in the key: on the current device (the common case) the launch needs only the stream.
        if device.type == "cuda" and launch._no_hooks() and _current_device() == device.index:
            bound(_current_stream(device.index), (query, key, value, out))
            return out
        if launch.replay(bound, (query, key, value, out)):   # another device current: guarded
            return out
    b, hq, sq, d = query.shape
    s, hk = key.shape[2], key.shape[1]
    if not (sq == 1 and key.shape[0] == b and kernel_takes(query, key, value, hq, hk)):
        return None
    scale = d ** -0.5 if scaling is None else float(scaling)
    q, k, v = query[:, :, 0], key.transpose(1, 2), value.transpose(1, 2)   # [b, hq, d], [b, s, hk, d] views
    if s == 0 or b == 0 or not _paged.use_triton(q):
        return decode_dense(q, k, v, scale)[:, None]
    from pagoda.kernels.launch import fast as _launch

    out = torch.empty(b, 1, hq, d, dtype=q.dtype, device=q.device)
    o3 = out[:, 0]
    launch_fn, n = _launch_fn(q, k, v, o3, scale)
    with _launch.recording() as launches:
        launch_fn()
    if len(launches) == n and not ((query.data_ptr() | key.data_ptr() | value.data_ptr()) & 15):
        # The views share their tensors' data pointers, so a replay swaps in the tensors themselves.
        if len(_hf) >= _MAX_BOUND:
            _hf.clear()
        _hf[hk_key] = (_launch.Bound(launches, (q, k, v, o3)), out.shape, out.device, _launch)
    return out

"""Validation shared by the paged-KV ops (append, decode, prefill): cache tensors and CSR metadata.

Every error names the argument and what was expected. Checks that need the metadata's values copy
them to the host (one small transfer) unless a CUDA graph is being captured, where only shapes and
dtypes are checked and the kernels' own bounds masks keep memory access legal.
"""
from __future__ import annotations

import torch

from pagoda import _switches
from pagoda.ops import _checks

KV_LAYOUTS = ("NHD", "HND")
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32 = (torch.int32,)


def check_kv_layout(kv_layout) -> str:
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
    return kv_layout


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch rule of the paged/RoPE/decode/prefill ops: the Triton kernels for CUDA tensors, the reference
    otherwise. Tests send CPU tensors to the kernels too (run by the interpreter: `pagoda._switches.triton_on_cpu`)
    so that they cover the ops' kernel path end to end without a GPU."""
    return t.is_cuda or _switches.triton_on_cpu()


def capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on t's device (no host reads allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_paged_kv_cache(paged_kv_cache, kv_layout: str) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """Return ``(k_cache, v_cache, page_size, num_kv_heads, head_dim)``.

    paged_kv_cache: ``[max_pages, 2, page_size, H, D]`` (NHD) / ``[max_pages, 2, H, page_size, D]`` (HND),
    or a ``(k_cache, v_cache)`` tuple of 4-D tensors of equal shape; fp16/bf16/fp32, last dim contiguous.
    """
    check_kv_layout(kv_layout)
    if isinstance(paged_kv_cache, torch.Tensor):
        _checks.check_tensor("paged_kv_cache", paged_kv_cache, ndim=5, dtypes=CACHE_DTYPES)
        if paged_kv_cache.shape[1] != 2:
            raise ValueError("paged_kv_cache must have shape [max_pages, 2, ...] (K at [:, 0], V at [:, 1]), "
                             f"got {tuple(paged_kv_cache.shape)}")
        k_cache, v_cache = paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    elif isinstance(paged_kv_cache, (tuple, list)) and len(paged_kv_cache) == 2:
        k_cache, v_cache = paged_kv_cache
        _checks.check_tensor("paged_kv_cache[0] (k_cache)", k_cache, ndim=4, dtypes=CACHE_DTYPES)
        _checks.check_tensor("paged_kv_cache[1] (v_cache)", v_cache, ndim=4, dtypes=CACHE_DTYPES)
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
                             f"and {tuple(v_cache.shape)}")
        _checks.check_same("k_cache, v_cache", (k_cache, v_cache), "dtype")
        _checks.check_same("k_cache, v_cache", (k_cache, v_cache), "device")
    else:
        raise TypeError("paged_kv_cache must be a 5-D tensor or a (k_cache, v_cache) tuple, "
                        f"got {type(paged_kv_cache).__name__}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_kv_cache must be contiguous in its last (head_dim) dimension")
    if kv_layout == "NHD":
        _, page_size, heads, dim = k_cache.shape
    else:
        _, heads, page_size, dim = k_cache.shape
    if page_size < 1 or heads < 1 or dim < 1:
        raise ValueError(f"paged_kv_cache has an empty page_size/num_kv_heads/head_dim: {tuple(k_cache.shape)}")
    return k_cache, v_cache, page_size, heads, dim


def cache_strides(cache: torch.Tensor, kv_layout: str) -> tuple[int, int, int]:
    """``(stride_page, stride_token, stride_head)`` of a 4-D k or v cache in either layout."""
    if kv_layout == "NHD":
        return cache.stride(0), cache.stride(1), cache.stride(2)
    return cache.stride(0), cache.stride(2), cache.stride(1)


def check_plan_device(name: str, t: torch.Tensor, device) -> None:
    """A wrapper's plan-time metadata tensor: on the host or on the wrapper's ``device``, each tensor on its own
    (FlashInfer's `plan` copies every one to the device, or into a CUDA-graph wrapper's buffers, wherever it
    lies). A tensor on any other device (another GPU, say) is an error."""
    device = torch.device(device)
    if t.device != device and t.device.type != "cpu":
        raise ValueError(f"{name} must be on the host (cpu) or on the wrapper's device {device}, got {t.device}")


def check_kv_csr(kv_indptr, kv_indices, kv_last_page_len, page_size: int, max_pages: int | None, device,
                 names=("kv_indptr", "kv_indices", "kv_last_page_len"), batch_size: int | None = None,
                 host_ok: bool = False) -> int:
    """CSR page table: int32 1-D tensors on ``device`` (None: kv_indptr's); return the batch size.
    ``host_ok`` (a wrapper's `plan`): each tensor may also lie on the host (`check_plan_device`).

    Values (unless capturing a CUDA graph): ``kv_indptr[0] == 0``, non-decreasing, last entry
    ``<= len(kv_indices)``; every used page id in ``[0, max_pages)``; ``kv_last_page_len[b]`` in
    ``1..page_size`` for a request with pages and ``0`` for one with none.
    """
    n_ptr, n_idx, n_last = names
    tensors = ((n_ptr, kv_indptr), (n_idx, kv_indices), (n_last, kv_last_page_len))
    for name, t in tensors:
        _checks.check_tensor(name, t, ndim=1, dtypes=_INT32)
    if device is None:
        device = kv_indptr.device
    for name, t in tensors:
        if host_ok:
            check_plan_device(name, t, device)
        elif t.device != torch.device(device):
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    if kv_indptr.shape[0] < 1:
        raise ValueError(f"{n_ptr} must have length batch_size + 1 >= 1, got 0")
    batch = kv_indptr.shape[0] - 1
    if batch_size is not None and batch != batch_size:
        raise ValueError(f"{n_ptr} must have length batch_size + 1 = {batch_size + 1}, got {kv_indptr.shape[0]}")
    if kv_last_page_len.shape[0] != batch:
        raise ValueError(f"{n_last} must have length batch_size = {batch} (len({n_ptr}) - 1), "
                         f"got {kv_last_page_len.shape[0]}")
    if any(capturing(t) for _, t in tensors):
        return batch
    ptr = kv_indptr.tolist()
    if ptr[0] != 0:
        raise ValueError(f"{n_ptr}[0] must be 0, got {ptr[0]}")
    if any(b < a for a, b in zip(ptr, ptr[1:])):
        raise ValueError(f"{n_ptr} must be non-decreasing, got {ptr if len(ptr) <= 16 else ptr[:16] + ['...']}")
    if ptr[-1] > kv_indices.shape[0]:
        raise ValueError(f"{n_ptr}[-1] = {ptr[-1]} exceeds len({n_idx}) = {kv_indices.shape[0]}")
    used = kv_indices[:ptr[-1]]
    if used.numel():
        lo, hi = int(used.min()), int(used.max())
        if max_pages is not None and (lo < 0 or hi >= max_pages):
            raise ValueError(f"{n_idx} must hold page ids in [0, {max_pages}) (max_pages of the cache), "
                             f"got values in [{lo}, {hi}]")
        if lo < 0:
            raise ValueError(f"{n_idx} must hold page ids >= 0, got a minimum of {lo}")
    last = kv_last_page_len.tolist()
    for b in range(batch):
        has_pages = ptr[b + 1] > ptr[b]
        if has_pages and not 1 <= last[b] <= page_size:
            raise ValueError(f"{n_last}[{b}] = {last[b]} must be in 1..page_size ({page_size}) for a request "
                             "with pages")
        if not has_pages and last[b] != 0:
            raise ValueError(f"{n_last}[{b}] = {last[b]} must be 0 for a request with no pages")
    return batch

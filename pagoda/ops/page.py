"""Paged KV cache ops with FlashInfer's signatures (``flashinfer.page``): CSR metadata and append.

Layout: see `pagoda.reference.page`. ``append_paged_kv_cache`` (and the fused RoPE + append,
``append_paged_kv_cache_with_rope``) runs a Triton kernel on CUDA and the PyTorch reference elsewhere. The metadata
helpers are a few vectorised torch ops, so the same code
serves every device (`get_batch_indices_positions` does not sync with the host).
"""
from __future__ import annotations

import functools

import torch

from pagoda.ops import _checks, _paged
from pagoda.reference import page as _ref

__all__ = ["get_seq_lens", "block_table_to_csr", "csr_to_block_table", "get_batch_indices_positions",
           "append_paged_kv_cache", "append_paged_kv_cache_with_rope"]

_INT = (torch.int32, torch.int64)


_INT32_MAX = 2 ** 31 - 1


def _int_arg(name: str, value, minimum: int, maximum: int = _INT32_MAX) -> int:
    """An int (not a bool) in ``minimum..maximum`` (default: what an int32 tensor holds)."""
    return _checks.check_int(name, value, minimum, maximum)


def get_seq_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """KV length of each request from CSR metadata.

    kv_indptr: int32 ``[batch + 1]``; kv_last_page_len: int32 ``[batch]``; page_size >= 1.
    Returns int32 ``[batch]``: ``(pages - 1) * page_size + last_page_len``, 0 for a request with no page.
    """
    page_size = _int_arg("page_size", page_size, 1)
    _checks.check_tensor("kv_indptr", kv_indptr, ndim=1, dtypes=_INT)
    _checks.check_tensor("kv_last_page_len", kv_last_page_len, ndim=1, dtypes=_INT)
    if kv_indptr.shape[0] != kv_last_page_len.shape[0] + 1:
        raise ValueError(f"kv_indptr must have length len(kv_last_page_len) + 1 = {kv_last_page_len.shape[0] + 1}, "
                         f"got {kv_indptr.shape[0]}")
    return _ref.get_seq_lens(kv_indptr, kv_last_page_len, page_size)


def block_table_to_csr(block_table: torch.Tensor, seq_lens: torch.Tensor,
                       page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block table to CSR: ``(kv_indptr [batch+1], kv_indices [total_pages], kv_last_page_len [batch])`` int32.

    block_table: int ``[batch, max_blocks]`` (row b: request b's page ids in order); seq_lens: int
    ``[batch]`` KV lengths, each needing at most ``max_blocks`` pages. Reads lengths on the host.
    """
    page_size = _int_arg("page_size", page_size, 1)
    _checks.check_tensor("block_table", block_table, ndim=2, dtypes=_INT)
    _checks.check_tensor("seq_lens", seq_lens, ndim=1, dtypes=_INT)
    if seq_lens.shape[0] != block_table.shape[0]:
        raise ValueError(f"seq_lens must have length batch = block_table.shape[0] = {block_table.shape[0]}, "
                         f"got {seq_lens.shape[0]}")
    if seq_lens.device != block_table.device:
        raise ValueError(f"seq_lens must be on {block_table.device}, got {seq_lens.device}")
    if seq_lens.numel():
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < 0:
            raise ValueError(f"seq_lens must be >= 0, got a minimum of {lo}")
        need = -(-hi // page_size)
        if need > block_table.shape[1]:
            raise ValueError(f"seq_lens needs up to {need} pages of {page_size} tokens but block_table has "
                             f"{block_table.shape[1]} columns")
        pages = (seq_lens.to(torch.int64) + page_size - 1) // page_size
        used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages[:, None]
        if bool((block_table[used] < 0).any()):
            raise ValueError("block_table must hold page ids >= 0 in the columns seq_lens uses")
    return _ref.block_table_to_csr(block_table, seq_lens, page_size)


def csr_to_block_table(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
                       page_size: int, max_blocks: int | None = None,
                       pad_value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR to ``(block_table int32 [batch, max_blocks], seq_lens int32 [batch])``.

    ``max_blocks`` defaults to the largest page count; unused entries hold ``pad_value``.
    """
    page_size = _int_arg("page_size", page_size, 1)
    batch = _paged.check_kv_csr(kv_indptr, kv_indices, kv_last_page_len, page_size, None, None)
    if max_blocks is not None:
        max_blocks = _int_arg("max_blocks", max_blocks, 0)
        most = int((kv_indptr[1:] - kv_indptr[:-1]).max()) if batch else 0
        if most > max_blocks:
            raise ValueError(f"max_blocks = {max_blocks} is less than the most pages of a request ({most})")
    pad_value = _int_arg("pad_value", pad_value, -(2 ** 31))
    return _ref.csr_to_block_table(kv_indptr, kv_indices, kv_last_page_len, page_size, max_blocks, pad_value)


def get_batch_indices_positions(append_indptr: torch.Tensor, seq_lens: torch.Tensor, nnz: int,
                                batch_indices: torch.Tensor | None = None,
                                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Request index and KV position of each appended token (FlashInfer's signature).

    append_indptr: int32 ``[batch + 1]`` prefix sums of the tokens appended per request;
    seq_lens: int ``[batch]`` KV lengths *after* the append (each >= its appended count);
    nnz: number of entries to produce (>= ``append_indptr[-1]``; extra entries get -1 and are skipped
    by `append_paged_kv_cache`). batch_indices/positions: optional int32 ``[nnz]`` outputs.
    Returns ``(batch_indices, positions)``, int32 ``[nnz]``; e.g. append_indptr ``[0, 1, 3]``,
    seq_lens ``[5, 5]`` gives ``[0, 1, 1]`` and ``[4, 3, 4]``.
    """
    nnz = _int_arg("nnz", nnz, 0)
    _checks.check_tensor("append_indptr", append_indptr, ndim=1, dtypes=_INT)
    _checks.check_tensor("seq_lens", seq_lens, ndim=1, dtypes=_INT)
    if append_indptr.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError(f"append_indptr must have length len(seq_lens) + 1 = {seq_lens.shape[0] + 1}, "
                         f"got {append_indptr.shape[0]}")
    if seq_lens.device != append_indptr.device:
        raise ValueError(f"seq_lens must be on {append_indptr.device}, got {seq_lens.device}")
    for name, t in (("batch_indices", batch_indices), ("positions", positions)):
        if t is not None:
            _checks.check_tensor(name, t, ndim=1, dtypes=(torch.int32,))
            if t.shape[0] != nnz or t.device != append_indptr.device:
                raise ValueError(f"{name} must be an int32 [{nnz}] tensor on {append_indptr.device}, "
                                 f"got {tuple(t.shape)} on {t.device}")
    if not _paged.capturing(append_indptr):
        ptr = append_indptr.tolist()
        if ptr[0] != 0 or any(b < a for a, b in zip(ptr, ptr[1:])):
            raise ValueError(f"append_indptr must start at 0 and be non-decreasing, got {ptr[:16]}")
        if ptr[-1] > nnz:
            raise ValueError(f"nnz = {nnz} is less than append_indptr[-1] = {ptr[-1]}")
        counts = append_indptr[1:] - append_indptr[:-1]
        if bool((seq_lens < counts).any()):
            raise ValueError("seq_lens (KV lengths after the append) must be >= the number of tokens "
                             "appended to each request")
    return _ref.get_batch_indices_positions(append_indptr, seq_lens, nnz, batch_indices, positions)


def append_paged_kv_cache(append_key: torch.Tensor, append_value: torch.Tensor, batch_indices: torch.Tensor,
                          positions: torch.Tensor, paged_kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                          kv_indices: torch.Tensor, kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor,
                          kv_layout: str = "NHD") -> None:
    """Append ragged keys/values into a paged KV cache in place (FlashInfer's signature).

    Args:
        append_key, append_value: ``[nnz, num_kv_heads, head_dim]``, the cache's dtype.
        batch_indices, positions: int32 ``[nnz]`` (see `get_batch_indices_positions`): token ``i``
            goes to request ``batch_indices[i]`` at KV position ``positions[i]``; a negative batch
            index skips the token.
        paged_kv_cache: ``[max_pages, 2, page_size, H, D]`` (NHD) / ``[max_pages, 2, H, page_size, D]``
            (HND), or a ``(k_cache, v_cache)`` tuple of 4-D tensors; fp16/bf16/fp32.
        kv_indices, kv_indptr, kv_last_page_len: int32 CSR page table of the cache *after* the
            append; every position must fall inside its request's KV length.
        kv_layout: ``"NHD"`` or ``"HND"``.

    Returns:
        None; the cache is written in place.

    Example:
        >>> batch_indices, positions = pagoda.get_batch_indices_positions(append_indptr, seq_lens, nnz)
        >>> pagoda.append_paged_kv_cache(k, v, batch_indices, positions, kv_cache, kv_indices, kv_indptr,
        ...                              kv_last_page_len)
    """
    k_cache, v_cache, page_size, nnz = _check_append(append_key, append_value, batch_indices, positions,
                                                      paged_kv_cache, kv_indices, kv_indptr, kv_last_page_len,
                                                      kv_layout)
    _append(append_key, append_value, batch_indices, positions, k_cache, v_cache, kv_indices, kv_indptr,
            kv_last_page_len, kv_layout, page_size, nnz)


def append_paged_kv_cache_with_rope(append_key: torch.Tensor, append_value: torch.Tensor, batch_indices: torch.Tensor,
                                    positions: torch.Tensor,
                                    paged_kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                                    kv_indices: torch.Tensor, kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor,
                                    kv_layout: str = "NHD", q: torch.Tensor | None = None,
                                    rotary_dim: int | None = None, interleave: bool = False, rope_scale: float = 1.0,
                                    rope_theta: float = 1e4, llama31: bool = False, low_freq_factor: float = 1.0,
                                    high_freq_factor: float = 4.0, old_context_len: int = 8192) -> None:
    """Fused "rotate k, then append": `append_paged_kv_cache` whose keys are RoPE-rotated at their KV
    ``positions`` on the way into the cache (``append_key`` itself is not modified).

    ``q``: optional ``[nnz, num_qo_heads, head_dim]`` (append_key's dtype, last dim contiguous), the
    queries of the same tokens, rotated in place at the same positions. RoPE options as in
    `pagoda.ops.rope.apply_rope_pos_ids` (``llama31=True``: as `apply_llama31_rope_pos_ids`, with its
    ``rope_scale``/``low_freq_factor``/``high_freq_factor``/``old_context_len``).
    """
    _append_with_rope(append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices, kv_indptr,
                      kv_last_page_len, kv_layout, q, rotary_dim, interleave, rope_scale, rope_theta, llama31,
                      low_freq_factor, high_freq_factor, old_context_len, check_values=True)


def _append_with_rope(append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices, kv_indptr,
                      kv_last_page_len, kv_layout="NHD", q=None, rotary_dim=None, interleave=False, rope_scale=1.0,
                      rope_theta=1e4, llama31=False, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192,
                      *, check_values: bool = True) -> None:
    """`append_paged_kv_cache_with_rope`; with ``check_values=False`` (a serving engine that built the
    metadata itself) only shapes, dtypes and devices are checked: no value of ``batch_indices``,
    ``positions`` or the page table is read on the host, so a step never waits for the device."""
    from pagoda.ops import rope as _rope
    from pagoda.reference import rope as _rope_ref

    k_cache, v_cache, page_size, nnz = _check_append(append_key, append_value, batch_indices, positions,
                                                      paged_kv_cache, kv_indices, kv_indptr, kv_last_page_len,
                                                      kv_layout, check_values)
    if not isinstance(llama31, bool):
        raise TypeError(f"llama31 must be a bool, got {type(llama31).__name__}")
    if q is not None:
        _checks.check_tensor("q", q, ndim=3, dtypes=(append_key.dtype,))
        if q.shape[0] != nnz or q.shape[2] != append_key.shape[2] or q.device != append_key.device:
            raise ValueError(f"q must be [nnz={nnz}, num_qo_heads, head_dim={append_key.shape[2]}] on "
                             f"{append_key.device}, got {tuple(q.shape)} on {q.device}")
        if q.stride(-1) != 1:
            raise ValueError("q is rotated in place: it must be contiguous in its last dimension")
    rd = _rope._check_qk(append_key, append_key, rotary_dim, interleave, False)
    if llama31:
        freq_args = _rope._llama_args(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len)
    else:
        freq_args = (_rope._positive("rope_scale", rope_scale), _rope._positive("rope_theta", rope_theta))
    freqs = (_rope_ref.rope_frequencies(rd, *freq_args, device=append_key.device) if check_values
             else _cached_frequencies(rd, tuple(freq_args), append_key.device))
    if nnz == 0:
        return
    if not _paged.use_triton(k_cache):
        _ref.append_paged_kv_cache_with_rope(append_key, append_value, batch_indices, positions, (k_cache, v_cache),
                                             kv_indices, kv_indptr, kv_last_page_len, kv_layout, q, rd, interleave,
                                             *freq_args)
        return
    from pagoda.kernels.rope import rope_fwd

    if q is not None:
        rope_fwd(q, q, positions[:nnz], freqs.to(torch.float32), interleave)
    _append(append_key, append_value, batch_indices, positions, k_cache, v_cache, kv_indices, kv_indptr,
            kv_last_page_len, kv_layout, page_size, nnz, freqs.to(torch.float32), interleave)


@functools.lru_cache(maxsize=16)
def _cached_frequencies(rotary_dim: int, freq_args: tuple, device: torch.device) -> torch.Tensor:
    """RoPE frequencies of one model, computed once (read-only): no kernels per layer and step."""
    from pagoda.reference import rope as _rope_ref

    return _rope_ref.rope_frequencies(rotary_dim, *freq_args, device=device).to(torch.float32)


def _check_csr_shapes(kv_indptr, kv_indices, kv_last_page_len, device) -> int:
    """`_paged.check_kv_csr` without reading any value: int32 1-D tensors on ``device``, consistent lengths."""
    for name, t in (("kv_indptr", kv_indptr), ("kv_indices", kv_indices), ("kv_last_page_len", kv_last_page_len)):
        _checks.check_tensor(name, t, ndim=1, dtypes=(torch.int32,))
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    if kv_indptr.shape[0] < 1 or kv_last_page_len.shape[0] != kv_indptr.shape[0] - 1:
        raise ValueError(f"kv_indptr must have length len(kv_last_page_len) + 1 = {kv_last_page_len.shape[0] + 1}, "
                         f"got {kv_indptr.shape[0]}")
    return kv_indptr.shape[0] - 1


def _check_append(append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices, kv_indptr,
                  kv_last_page_len, kv_layout, check_values: bool = True):
    """Validate append arguments; return ``(k_cache, v_cache, page_size, nnz)``. ``check_values=False``:
    shapes, dtypes and devices only (no host read)."""
    k_cache, v_cache, page_size, heads, dim = _paged.check_paged_kv_cache(paged_kv_cache, kv_layout)
    for name, t in (("append_key", append_key), ("append_value", append_value)):
        _checks.check_tensor(name, t, ndim=3)
        if tuple(t.shape[1:]) != (heads, dim):
            raise ValueError(f"{name} must have shape [nnz, num_kv_heads={heads}, head_dim={dim}] to match "
                             f"paged_kv_cache, got {tuple(t.shape)}")
        if t.dtype != k_cache.dtype:
            raise TypeError(f"{name} must have the cache's dtype {k_cache.dtype}, got {t.dtype}")
        if t.device != k_cache.device:
            raise ValueError(f"{name} must be on the cache's device {k_cache.device}, got {t.device}")
    if append_value.shape[0] != append_key.shape[0]:
        raise ValueError(f"append_key and append_value must have the same nnz, got {append_key.shape[0]} "
                         f"and {append_value.shape[0]}")
    nnz = append_key.shape[0]
    for name, t in (("batch_indices", batch_indices), ("positions", positions)):
        _checks.check_tensor(name, t, ndim=1, dtypes=(torch.int32,))
        if t.shape[0] < nnz or t.device != k_cache.device:
            raise ValueError(f"{name} must be an int32 tensor of length >= nnz ({nnz}) on {k_cache.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
    if not check_values:
        _check_csr_shapes(kv_indptr, kv_indices, kv_last_page_len, k_cache.device)
        return k_cache, v_cache, page_size, nnz
    batch = _paged.check_kv_csr(kv_indptr, kv_indices, kv_last_page_len, page_size, k_cache.shape[0],
                                k_cache.device)
    if nnz and not _paged.capturing(append_key):
        b, pos = batch_indices[:nnz].to(torch.int64), positions[:nnz].to(torch.int64)
        live = b >= 0
        if bool((b >= batch).any()):
            raise ValueError(f"batch_indices must be < batch_size ({batch}), got max {int(b.max())}")
        # After the check above, a live token implies batch >= 1, so the gather below is in range.
        lens = _ref.get_seq_lens(kv_indptr, kv_last_page_len, page_size).to(torch.int64)
        lens = torch.cat([lens, lens.new_zeros(1)])  # index -1 (skipped tokens) reads a harmless 0
        bad = live & ((pos < 0) | (pos >= lens[b]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"positions[{i}] = {int(pos[i])} is outside request {int(b[i])}'s KV length per "
                             "kv_indptr/kv_last_page_len")
    return k_cache, v_cache, page_size, nnz


def _append(append_key, append_value, batch_indices, positions, k_cache, v_cache, kv_indices, kv_indptr,
            kv_last_page_len, kv_layout, page_size, nnz, rope_freqs=None, interleave=False) -> None:
    """Dispatch a validated append (Triton, or the reference; rope_freqs only on the Triton path)."""
    if nnz == 0:
        return
    if not _paged.use_triton(k_cache):
        live = batch_indices[:nnz] >= 0
        if bool(live.all()):
            _ref.append_paged_kv_cache(append_key, append_value, batch_indices, positions, (k_cache, v_cache),
                                       kv_indices, kv_indptr, kv_last_page_len, kv_layout)
        else:
            _ref.append_paged_kv_cache(append_key[live], append_value[live], batch_indices[:nnz][live],
                                       positions[:nnz][live], (k_cache, v_cache), kv_indices, kv_indptr,
                                       kv_last_page_len, kv_layout)
        return

    from pagoda.kernels.page import append_paged_kv

    append_key = append_key if append_key.stride(-1) == 1 else append_key.contiguous()
    append_value = append_value if append_value.stride(-1) == 1 else append_value.contiguous()
    append_paged_kv(append_key, append_value, batch_indices, positions, k_cache, v_cache, kv_indices, kv_indptr,
                    _paged.cache_strides(k_cache, kv_layout), _paged.cache_strides(v_cache, kv_layout), page_size,
                    rope_freqs, interleave)

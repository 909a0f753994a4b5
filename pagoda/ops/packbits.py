"""Bit packing of boolean masks, FlashInfer's ``packbits`` / ``segment_packbits`` (``flashinfer.quantization``).

The custom attention masks of the prefill wrappers (`pagoda.ops.prefill`) travel as one bit per score:
``custom_mask`` flattened per request (``[qo_len, kv_len]`` row-major) and concatenated, then packed 8 to a byte
in "little" bit order (element ``8 * i + b`` is bit ``b`` of byte ``i``), each request's segment starting at a
byte boundary (`segment_packbits`). Semantics of one segment are ``numpy.packbits``'s. Plain PyTorch: runs on
any device, no host sync in `packbits` (`segment_packbits` reads the segment lengths on the host, as FlashInfer's
does).
"""
from __future__ import annotations

import torch

__all__ = ["packbits", "segment_packbits"]

_BITORDERS = ("big", "little")


def _check_bitorder(bitorder) -> str:
    if bitorder not in _BITORDERS:
        raise ValueError(f"bitorder must be 'big' or 'little', got {bitorder!r}")
    return bitorder


def _weights(bitorder: str, device) -> torch.Tensor:
    """Byte weight of bit position 0..7 of a group of 8 elements."""
    shifts = torch.arange(8, device=device, dtype=torch.uint8)
    if bitorder == "big":
        shifts = 7 - shifts
    return torch.ones(8, dtype=torch.uint8, device=device) << shifts


def _check_1d(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")


def packbits(x: torch.Tensor, bitorder: str = "big") -> torch.Tensor:
    """Pack a 1-D binary-valued tensor into bits, 8 elements per uint8 (``numpy.packbits``).

    Args:
        x: 1-D tensor of any dtype (non-zero = 1), ``[n]``.
        bitorder: ``"big"`` (element 0 is the most significant bit of byte 0, FlashInfer's default) or
            ``"little"`` (element 0 is bit 0: the layout of ``packed_custom_mask``).

    Returns:
        uint8 ``[(n + 7) // 8]`` on x's device; the last byte's unused bits are 0.

    Example:
        >>> pagoda.packbits(torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool))
        tensor([179], dtype=torch.uint8)
    """
    _check_1d("x", x)
    bitorder = _check_bitorder(bitorder)
    n = x.shape[0]
    bits = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=x.device)
    bits[:n] = x.ne(0)
    return (bits.view(-1, 8) * _weights(bitorder, x.device)).sum(1, dtype=torch.uint8)


def segment_packbits(x: torch.Tensor, indptr: torch.Tensor, bitorder: str = "big") -> tuple[torch.Tensor, torch.Tensor]:
    """Pack each segment ``x[indptr[i]:indptr[i+1]]`` separately (each starts at a byte boundary).

    Args:
        x: 1-D binary-valued tensor ``[indptr[-1]]``.
        indptr: integer ``[batch + 1]``, non-decreasing from 0.
        bitorder: as in `packbits`.

    Returns:
        ``(packed, indptr_new)``: uint8 ``[indptr_new[-1]]`` and int32 ``[batch + 1]`` on indptr's device with
        ``indptr_new[i+1] - indptr_new[i] == (indptr[i+1] - indptr[i] + 7) // 8``.

    Example:
        >>> x = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
        >>> pagoda.segment_packbits(x, torch.tensor([0, 4, 7, 11]), bitorder="big")
        (tensor([176,  32, 208], dtype=torch.uint8), tensor([0, 1, 2, 3], dtype=torch.int32))
    """
    _check_1d("x", x)
    _check_1d("indptr", indptr)
    bitorder = _check_bitorder(bitorder)
    if indptr.dtype.is_floating_point or indptr.dtype == torch.bool or indptr.shape[0] < 1:
        raise TypeError(f"indptr must be an integer tensor of length batch + 1 >= 1, got {indptr.dtype} "
                        f"{tuple(indptr.shape)}")
    ptr = indptr.tolist()
    if ptr[0] != 0 or any(b < a for a, b in zip(ptr, ptr[1:])) or ptr[-1] > x.shape[0]:
        raise ValueError(f"indptr must start at 0, be non-decreasing and end at most at len(x) = {x.shape[0]}, "
                         f"got {ptr[:8]}{'...' if len(ptr) > 8 else ''}")
    seg = indptr[1:].long() - indptr[:-1].long()
    new = torch.zeros(len(ptr), dtype=torch.int32, device=indptr.device)
    new[1:] = torch.cumsum((seg + 7) // 8, 0)
    # Scatter every element to its place in a byte-aligned copy, then pack the copy as one array.
    lens = [b - a for a, b in zip(ptr, ptr[1:])]
    padded_start = torch.tensor([8 * s for s in new.tolist()[:-1]], dtype=torch.long, device=x.device)
    elem_start = torch.tensor(ptr[:-1], dtype=torch.long, device=x.device)
    seg_id = torch.repeat_interleave(torch.arange(len(lens), device=x.device), torch.tensor(lens, device=x.device))
    pos = torch.arange(ptr[-1], device=x.device) - elem_start[seg_id] + padded_start[seg_id]
    flat = torch.zeros(8 * int(new[-1]), dtype=torch.bool, device=x.device)
    flat[pos] = x[:ptr[-1]].ne(0)
    return packbits(flat, bitorder).to(indptr.device), new

"""A step's index tables on the host: lists of ints and int32 arrays packed into one int32 (or int64) tensor,
pinned on a GPU so that the copy to the device and the attention plans that read it do not wait for the device.

Every table in a packed tensor starts on a 16-byte boundary: Triton specialises pointer arguments on 16-byte
alignment, so starts that moved with a step's token and request counts would make each kernel that reads the
tables (the KV append, the attention kernels) compile once per alignment pattern.
"""
from __future__ import annotations

import numpy as np
import torch


def host_tensor(values: list[int], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host tensor of ``values`` (int32 or int64; pinned with ``pin``)."""
    t = torch.from_numpy(np.asarray(values, dtype=np.int32 if dtype == torch.int32 else np.int64))
    return t.pin_memory() if pin else t


def pack_int32(parts: list, pin: bool) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``parts`` (lists of ints or int32 arrays) in one int32 host tensor (pinned with ``pin``) and each part's
    ``(start, end)`` in it; every start a multiple of 4 elements (16 bytes)."""
    spans, pos = [], 0
    for part in parts:
        pos += -pos % 4
        spans.append((pos, pos + len(part)))
        pos += len(part)
    values = np.zeros(pos, dtype=np.int32)
    for (a, b), part in zip(spans, parts, strict=True):
        if b > a:
            values[a:b] = part
    t = torch.from_numpy(values)
    return (t.pin_memory() if pin else t), spans

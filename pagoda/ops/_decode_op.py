"""Decode in Hugging Face's layout as a torch custom op: what `pagoda.integrations.transformers` runs when
HF ``generate`` compiles the decode step of a static cache (``torch.compile``, CUDA graphs).

Under torch.compile the eager path of the integration would break the graph at every layer: it reads the
mask back to the host (one sync per forward) and keys launches on data pointers. This op takes what the
mask says as device tensors instead (``kv_len``: keys past the last visible one are not read; ``key_mask``:
which of the others are seen), so a compiled step has no host sync and the decode kernel is captured with
the rest of the step. Inductor sees one opaque call per layer (the fake below gives the output's shape).

No ``from __future__ import annotations`` here: torch.library reads the annotations as types.
"""
from typing import Optional

import torch

from pagoda.ops.decode_dense import decode_dense_masked


@torch.library.custom_op("pagoda::decode_hf", mutates_args=())
def decode_hf_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: Optional[torch.Tensor],
                 kv_len: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """query ``[b, hq, 1, d]``, key/value ``[b, hk, s, d]`` (HF's layout, any strides), key_mask None or bool
    ``[b, >= s]``, kv_len int32 ``[b]`` (<= s) -> out ``[b, 1, hq, d]`` (what an HF attention function
    returns). Shapes, dtypes and devices are checked here (once per captured graph under torch.compile);
    kv_len's values are the caller's (each at most s: `pagoda.integrations.transformers` derives them from the
    mask)."""
    _check(query, key, value, key_mask, kv_len)
    b, hq, _, d = query.shape
    out = torch.empty(b, 1, hq, d, dtype=query.dtype, device=query.device)
    decode_dense_masked(query[:, :, 0], key.transpose(1, 2), value.transpose(1, 2), scale, key_mask, kv_len,
                        softcap, out=out[:, 0])
    return out


def _check(query, key, value, key_mask, kv_len) -> None:
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"query must be [batch, heads, 1, head_dim], got {tuple(query.shape)}")
    b, hq, _, d = query.shape
    if key.dim() != 4 or key.shape[0] != b or key.shape[3] != d or value.shape != key.shape:
        raise ValueError(f"key/value must be [batch={b}, kv_heads, seqlen, head_dim={d}] alike, got "
                         f"{tuple(key.shape)} / {tuple(value.shape)}")
    if key.shape[1] == 0 or hq % key.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({key.shape[1]})")
    if d % 8 or d > 256:
        raise ValueError(f"head_dim must be a multiple of 8 up to 256, got {d}")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if kv_len.shape != (b,) or kv_len.dtype != torch.int32:
        raise ValueError(f"kv_len must be int32 [{b}], got {kv_len.dtype} {tuple(kv_len.shape)}")
    if key_mask is not None and (key_mask.dim() != 2 or key_mask.shape[0] != b or key_mask.shape[1] < key.shape[2]
                                 or key_mask.dtype not in (torch.bool, torch.uint8)):
        raise ValueError(f"key_mask must be bool/uint8 [{b}, >= {key.shape[2]}], got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)}")
    devices = {t.device for t in (query, key, value, kv_len, key_mask) if t is not None}
    if len(devices) != 1:
        raise ValueError("query, key, value, kv_len and key_mask must be on one device, got "
                         f"{sorted(map(str, devices))}")


@decode_hf_op.register_fake
def _decode_hf_fake(query, key, value, key_mask, kv_len, scale, softcap):
    _check(query, key, value, key_mask, kv_len)      # bad arguments fail while tracing, not at the first run
    b, hq, _, d = query.shape
    return query.new_empty((b, 1, hq, d))

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
    returns). Arguments are the caller's to check (`decode_dense_masked`'s preconditions)."""
    b, hq, _, d = query.shape
    out = torch.empty(b, 1, hq, d, dtype=query.dtype, device=query.device)
    decode_dense_masked(query[:, :, 0], key.transpose(1, 2), value.transpose(1, 2), scale, key_mask, kv_len,
                        softcap, out=out[:, 0])
    return out


@decode_hf_op.register_fake
def _decode_hf_fake(query, key, value, key_mask, kv_len, scale, softcap):
    b, hq, _, d = query.shape
    return query.new_empty((b, 1, hq, d))

"""Custom-mask generators for the masked-prefill tests: random, speculative-decoding trees, prefix-LM, and
masks with rows that see nothing. Each returns a bool ``[qo_len, kv_len]``; query ``i`` sits at key position
``i + kv_len - qo_len``."""
from __future__ import annotations

import torch


def positions(qo: int, kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(qo)[:, None] + (kv - qo), torch.arange(kv)[None, :]


def random_mask(qo: int, kv: int, density: float = 0.5, causal: bool = False) -> torch.Tensor:
    m = torch.rand(qo, kv) < density
    if causal:
        i, j = positions(qo, kv)
        m &= j <= i
    return m


def tree_mask(qo: int, kv: int) -> torch.Tensor:
    """Tree verification (SpecInfer/Medusa style): the ``kv - qo`` context keys are visible to every draft token;
    draft token ``t`` (the last ``qo`` keys) sees itself and its ancestors in a random tree."""
    ctx = kv - qo
    parent = [-1] + [int(torch.randint(0, t, ()).item()) for t in range(1, qo)]
    m = torch.zeros(qo, kv, dtype=torch.bool)
    m[:, :ctx] = True
    for t in range(qo):
        a = t
        while a >= 0:
            m[t, ctx + a] = True
            a = parent[a]
    return m


def prefix_lm_mask(qo: int, kv: int, prefix: int) -> torch.Tensor:
    """Bidirectional over the first ``prefix`` keys, causal after them."""
    i, j = positions(qo, kv)
    return (j < prefix) | (j <= i)


def with_empty_rows(m: torch.Tensor, rows) -> torch.Tensor:
    m = m.clone()
    m[list(rows)] = False
    return m


def block_half_empty(qo: int, kv: int, block_q: int, block_k: int) -> torch.Tensor:
    """Random bits in half of the (block_q x block_k) blocks (a checkerboard), nothing in the others."""
    i, j = torch.arange(qo)[:, None] // block_q, torch.arange(kv)[None, :] // block_k
    return ((i + j) % 2 == 0) & (torch.rand(qo, kv) < 0.5)


def flat(masks) -> torch.Tensor:
    return torch.cat([m.reshape(-1) for m in masks]) if masks else torch.zeros(0, dtype=torch.bool)

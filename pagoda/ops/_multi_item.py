"""FlashInfer's multi-item scoring, planned as a custom mask.

`BatchPrefillWithPagedKVCacheWrapper.plan(..., prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len,
max_item_len_ptr)` scores several candidate items against one shared prefix in one pass. Request ``b``'s keys
are its prefix (``P = prefix_len_ptr[b]`` tokens), then items, each led by a delimiter:
``[prefix][d item 1][d item 2]...``. ``token_pos_in_items_ptr[b * token_pos_in_items_len + t]`` is the position
of the key ``P + t`` inside its item: 0 at a delimiter, then 1, 2, ...

The query at key position ``i`` (query row ``q`` of ``qo_len`` sits at ``i = q + kv_len - qo_len``) sees key
``j`` iff ``j <= i`` (always causal, whatever ``causal`` says) and, for ``i >= P``: ``j < P`` or
``i - j < token_pos(i)``. So an item's token sees the whole prefix and its own item up to itself, a delimiter
sees the prefix only, and no token sees another item or any delimiter; a query inside the prefix is plainly
causal. ``max_item_len_ptr[b]`` (FlashInfer's kernel skips the key tiles before ``i - max_item_len``) must be at
least every position of the request's items, or FlashInfer would drop visible keys: pagoda checks it. The rule
is FlashInfer's kernel's (its FA2 backend's ``logits_mask`` for multi-item scoring); window_left still applies.

The mask is built on the host (``[qo_len, kv_len]`` per request, FlashInfer's ``custom_mask`` layout) and runs
through the custom-mask path (`pagoda.ops._mask`), which skips the key tiles the items never see.
"""
from __future__ import annotations

import torch

NAMES = ("prefix_len_ptr", "token_pos_in_items_ptr", "token_pos_in_items_len", "max_item_len_ptr")


def given(prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr) -> bool:
    """Whether multi-item scoring is asked for (``prefix_len_ptr`` given); the other arguments are then needed."""
    if prefix_len_ptr is None:
        others = [n for n, v in zip(NAMES[1:], (token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr),
                                    strict=True) if v is not None and not (n == "token_pos_in_items_len" and v == 0)]
        if others:
            raise ValueError(f"{', '.join(others)} given without prefix_len_ptr: multi-item scoring needs all of "
                             f"{', '.join(NAMES)}")
        return False
    if token_pos_in_items_ptr is None:
        raise ValueError("multi-item scoring (prefix_len_ptr given) needs token_pos_in_items_ptr")
    if isinstance(token_pos_in_items_len, bool) or not isinstance(token_pos_in_items_len, int) \
            or token_pos_in_items_len < 1:
        raise ValueError("multi-item scoring needs token_pos_in_items_len, the row length of "
                         f"token_pos_in_items_ptr (an int >= 1), got {token_pos_in_items_len!r}")
    return True


def check_plan(prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr, custom_mask,
               packed_custom_mask) -> bool:
    """`given`, and no user mask beside it (multi-item scoring builds its own): whether it is asked for."""
    multi = given(prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr)
    if multi and (custom_mask is not None or packed_custom_mask is not None):
        raise ValueError("multi-item scoring (prefix_len_ptr) builds its own mask: pass no custom_mask or "
                         "packed_custom_mask with it")
    return multi


def _host_ints(name: str, t, batch: int | None = None) -> list[int]:
    """The tensor's entries in order, whatever its shape: FlashInfer's kernel reads these arguments as flat
    arrays (entry ``b`` for request ``b``), so a 0-d tensor is one entry, as FlashInfer's own test passes
    ``prefix_len_ptr`` for a batch of one."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if batch is not None and t.numel() < batch:
        raise ValueError(f"{name} must hold one entry per request ({batch}), got {t.numel()} "
                         f"(shape {tuple(t.shape)})")
    return t.detach().to("cpu").reshape(-1).to(torch.int64).tolist()


def dense_mask(prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len: int, max_item_len_ptr,
               qo_lens: list[int], kv_lens: list[int]) -> torch.Tensor:
    """The multi-item visibility of every request, as FlashInfer's ``custom_mask``: bool, each request's
    ``[qo_len, kv_len]`` flattened and concatenated (host tensor). Errors name the argument at fault."""
    batch, stride = len(qo_lens), token_pos_in_items_len
    prefix = _host_ints("prefix_len_ptr", prefix_len_ptr, batch)
    pos = torch.tensor(_host_ints("token_pos_in_items_ptr", token_pos_in_items_ptr), dtype=torch.int64)
    bound = _host_ints("max_item_len_ptr", max_item_len_ptr, batch) if max_item_len_ptr is not None else None
    parts = []
    for b, (qo, kv) in enumerate(zip(qo_lens, kv_lens, strict=True)):
        p = prefix[b]
        if qo > kv:
            raise ValueError(f"request {b} has {qo} queries but only {kv} keys: multi-item scoring is causal "
                             "(append the new tokens to the cache before prefill, kv_len >= qo_len)")
        if not 0 <= p <= kv:
            raise ValueError(f"prefix_len_ptr[{b}] = {p} is outside the request's {kv} keys")
        i = torch.arange(kv - qo, kv, dtype=torch.int64)[:, None]          # each query's key position
        j = torch.arange(kv, dtype=torch.int64)[None, :]
        item_rows = max(kv - p, 0)        # key positions P .. kv - 1 carry a position in their item
        needed = min(item_rows, kv - max(kv - qo, p))   # the queries past the prefix read theirs
        if needed > 0:
            first = max(kv - qo, p) - p
            if first + needed > stride:
                raise ValueError(f"request {b} reads token_pos_in_items_ptr up to position {first + needed - 1} "
                                 f"of its row, past token_pos_in_items_len = {stride}")
            lo = b * stride + first
            if lo + needed > pos.shape[0]:
                raise ValueError(f"token_pos_in_items_ptr has {pos.shape[0]} entries; request {b} needs "
                                 f"{lo + needed} (row {b} of length {stride})")
            tp = pos[lo:lo + needed]
            if int(tp.min()) < 0:
                raise ValueError(f"token_pos_in_items_ptr holds a negative position for request {b}")
            if bound is not None and int(tp.max()) > bound[b]:
                raise ValueError(f"max_item_len_ptr[{b}] = {bound[b]} is below the request's longest item position "
                                 f"{int(tp.max())} (FlashInfer's kernel would skip keys that are visible)")
        # Position in item per query row (rows inside the prefix: unused, they are plainly causal).
        tp_rows = torch.zeros(qo, dtype=torch.int64)
        in_items = i[:, 0] >= p
        if needed > 0:
            tp_rows[in_items] = tp
        vis = (j <= i) & ((i < p) | (j < p) | (i - j < tp_rows[:, None]))
        parts.append(vis.reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

"""Hugging Face transformers integration: ``attn_implementation="pagoda"``.

    import pagoda.integrations.transformers as pt
    pt.register()                       # once per process (register(sampling=True): the samplers too)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="pagoda")

Every attention call of the model then runs through `pagoda.flash_attn_func` or
`pagoda.flash_attn_varlen_func`:

- decode (one query token that sees every cached key, no window or soft cap): `pagoda.ops.decode_dense`,
  the split-KV decode kernel on HF's cache as it is (one page per sequence; GQA heads share each key
  read; page table built once per step), with less host work than a `flash_attn_func` call. Without a
  mask (unpadded batches) `decode_hf` replays the step's first launch for every later layer with only
  the tensors swapped.
- no mask (prefill of unpadded sequences): `flash_attn_func` on the tensors as HF hands them
  (strided views, nothing copied). HF drops the mask of a prefill into an empty static cache too; the
  keys past the prompt are then empty slots and are cut off, as HF's SDPA path does.
- a 4-D mask: read back into per-sequence query/key sets and checked to be exactly "causal
  (bottom-right) + sliding window over the valid keys". When every sequence has the same contiguous
  key and query ranges (static cache without padding: keys ``[0, position]``) the call is
  `flash_attn_func` on slices of the cache; otherwise (padding) the valid tokens are gathered into a
  ragged batch for `flash_attn_varlen_func`. A mask of any other shape (custom masks, packed
  documents) is handled exactly by falling back to torch SDPA with that mask for that call.

Under torch.compile (HF compiles a static cache's decode step, with CUDA graphs on a GPU) nothing may
read a mask back to the host: decode then runs the `pagoda::decode_hf` custom op with the visible keys
computed from the mask on the device (keys past the last visible one are not read), and a prefill runs
`flash_attn_func` without a mask or exact SDPA with one (`_traced_forward`). No graph breaks.

HF builds one mask per forward and hands the same tensor to every layer, so the reading of a mask
(the only host synchronisation of this module) is done once per forward and reused by the other
layers (`_LAYOUTS`); a decode step therefore costs one sync, not one per layer (`generate` runs under
``torch.no_grad``; under ``torch.inference_mode`` masks carry no version counter and are read per call).
"""
from __future__ import annotations

import weakref

import torch

from pagoda.ops import _decode_op  # noqa: F401 - registers torch.ops.pagoda.decode_hf
from pagoda.ops.attention import flash_attn_func, flash_attn_varlen_func
from pagoda.ops.decode_dense import decode_dense, decode_hf, kernel_takes

__all__ = ["register", "register_sampling", "pagoda_attention_forward", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "pagoda"

# Mask layouts read this forward: (id(mask), causal, window_left, q_len, k_len) -> (weakref to the mask,
# its version counter, layout). The weakref and version make a reused id or an in-place edit a miss.
# Process-global on purpose (HF calls the attention function without any per-model state); bounded.
_LAYOUTS: dict[tuple, tuple] = {}
_MAX_LAYOUTS = 16
_FALLBACK = ("fallback",)


def register(name: str = ATTN_IMPLEMENTATION, *, sampling: bool = False) -> str:
    """Register pagoda with transformers' attention (and, where it exists, mask) interfaces; returns ``name``.
    ``sampling=True`` also makes every ``generate(do_sample=True, ...)`` use pagoda's sorting-free top-k / top-p /
    min-p / temperature warpers (`register_sampling`)."""
    from transformers import AttentionInterface

    if sampling:
        register_sampling()

    AttentionInterface.register(name, pagoda_attention_forward)
    try:  # transformers >= 4.53: masks are built per attention implementation
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older: the model builds an additive float mask, read by `_allowed` as well
        return name
    # SDPA's mask builder: a boolean [b, 1, q, k] mask, or None when the plain causal mask suffices.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def register_sampling() -> None:
    """``generate(do_sample=True, top_k=..., top_p=..., min_p=..., temperature=...)`` samples through pagoda's
    sorting-free warpers in this process, with HF's distribution (`pagoda.integrations.hf_sampling`); greedy and
    every other processor unchanged. Attention is not touched. ``hf_sampling.disable()`` undoes it."""
    from pagoda.integrations import hf_sampling

    hf_sampling.enable()


def _allowed(mask: torch.Tensor) -> torch.Tensor | None:
    """Boolean [b, q, k] 'may attend' from HF's 4-D mask (bool, or additive float with 0 = attend)."""
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be 4-D [batch, heads|1, q, k], got shape {tuple(mask.shape)}")
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if allowed.shape[1] != 1 and not bool((allowed == allowed[:, :1]).all()):
        return None  # per-head masks: not a padding/causal pattern
    return allowed[:, 0]


def _expected(allowed: torch.Tensor, causal: bool, window_left: int):
    """Valid queries ``[b, q]``, valid keys ``[b, k]`` of ``allowed`` [b, q, k], and the mask that
    "causal (bottom-right) + window over each row's valid keys" would give them: equal to ``allowed``
    exactly when the mask is such a pattern."""
    valid_k = allowed.any(dim=1)                       # keys anyone may see
    valid_q = allowed.any(dim=2)                       # queries that see something
    rank_k = valid_k.cumsum(dim=1) - 1                 # compact key index
    rank_q = valid_q.cumsum(dim=1) - 1
    shift = valid_k.sum(dim=1) - valid_q.sum(dim=1)    # bottom-right alignment per sequence
    pos_q = (rank_q + shift[:, None])[:, :, None]      # [b, q, 1]
    expected = valid_q[:, :, None] & valid_k[:, None, :]
    if causal:
        expected &= rank_k[:, None, :] <= pos_q
    if window_left >= 0:
        expected &= rank_k[:, None, :] >= pos_q - window_left
    return valid_q, valid_k, expected


def _first_run(row: torch.Tensor):
    """A boolean row ``[n]``: (start, length, is one contiguous run) as 0-d int64 tensors."""
    start = row.int().argmax()                         # first True (0 if none)
    runs = (row[1:] & ~row[:-1]).sum() + row[0]        # number of maximal runs of True
    return start, row.sum(), (runs <= 1).long()


def _read_mask(mask: torch.Tensor, causal: bool, window_left: int, q_len: int, k_len: int):
    """The layout of one mask, read with one device-to-host copy (plus one for per-head masks):
    ``("dense", qs, qe, ks, ke)``: every sequence attends queries [qs, qe) to keys [ks, ke);
    ``("ragged", (bq, tq), (bk, tk), cu_q, cu_k, max_q, max_k)``: gather indices and cu_seqlens;
    ``_FALLBACK``: not a causal/padding/window pattern (exact SDPA with the mask)."""
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be 4-D [batch, heads|1, q, k], got shape {tuple(mask.shape)}")
    mask = mask[..., :k_len]                            # some transformers versions hand a longer key axis
    if mask.shape[-2] != q_len or mask.shape[-1] != k_len:
        return _FALLBACK                                # broadcast query axis etc.: SDPA handles it exactly
    allowed = _allowed(mask)
    if allowed is None:
        return _FALLBACK
    if q_len == 1 and window_left < 0:
        # Decode: one query per sequence sees all its valid keys, whichever they are: always the pattern.
        valid_k = allowed[:, 0]
        valid_q = valid_k.any(dim=1, keepdim=True)
        nq, nk = valid_q.sum(dim=1), valid_k.sum(dim=1)
        one = torch.ones((), dtype=torch.long, device=mask.device)
        stats = [one, (valid_k == valid_k[:1]).all().long(), 0 * one, nq[0], one, *_first_run(valid_k[0]), one,
                 nk.max()]
    else:
        valid_q, valid_k, expected = _expected(allowed, causal, window_left)
        nq, nk = valid_q.sum(dim=1), valid_k.sum(dim=1)
        uniform = (valid_q == valid_q[:1]).all() & (valid_k == valid_k[:1]).all()
        stats = [(expected == allowed).all().long(), uniform.long(), *_first_run(valid_q[0]),
                 *_first_run(valid_k[0]), nq.max(), nk.max()]
    ok, same, qs, nq0, q_run, ks, nk0, k_run, max_q, max_k = torch.stack(stats).tolist()   # the one sync
    if not ok:
        return _FALLBACK
    if same and q_run and k_run:
        return ("dense", qs, qs + nq0, ks, ks + nk0)
    bq, tq = valid_q.nonzero(as_tuple=True)
    bk, tk = valid_k.nonzero(as_tuple=True)
    cu_q = torch.nn.functional.pad(nq.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = torch.nn.functional.pad(nk.cumsum(0, dtype=torch.int32), (1, 0))
    return ("ragged", (bq, tq), (bk, tk), cu_q, cu_k, max_q, max_k)


def _layout(mask: torch.Tensor, causal: bool, window_left: int, q_len: int, k_len: int):
    """`_read_mask`, memoised on the mask tensor (one read per forward, not per layer). Inference tensors
    (made under ``torch.inference_mode``) have no version counter to see in-place edits: read every call."""
    if torch.compiler.is_compiling() or mask.is_inference():
        return _read_mask(mask, causal, window_left, q_len, k_len)
    key = (id(mask), causal, window_left, q_len, k_len)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    layout = _read_mask(mask, causal, window_left, q_len, k_len)
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS[key] = (weakref.ref(mask), mask._version, layout)
    return layout


def _scale(scaling: float | None, q: torch.Tensor) -> float:
    return q.shape[-1] ** -0.5 if scaling is None else float(scaling)


def pagoda_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             sliding_window: int | None = None, softcap: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function. query ``[b, hq, q, d]``, key/value ``[b, hk, k, d]``.

    Returns ``(attn_output [b, q, hq, d], None)`` (attention weights are never materialised).
    Attention sinks (``s_aux``, GPT-OSS) are not supported: NotImplementedError rather than a wrong result.
    """
    if kwargs and kwargs.get("s_aux") is not None:
        raise NotImplementedError("pagoda attention does not support attention sinks (s_aux); use "
                                  "attn_implementation='eager' for this model")
    if torch.compiler.is_compiling():
        return _traced_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                               sliding_window, softcap), None
    if attention_mask is None and query.shape[2] == 1 and not sliding_window and not softcap and not (
            dropout and module.training):
        # Decode without a mask (generate's steps over unpadded batches): the least host work per layer.
        out = decode_hf(query, key, value, scaling)
        if out is not None:
            return out, None
    if dropout and module.training:
        raise NotImplementedError("pagoda attention is inference-only: dropout is not supported in training mode")
    causal, window_left, window = _causal_window(module, is_causal, sliding_window)
    cap = float(softcap) if softcap else 0.0
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)   # [b, s, h, d] views
    sq, sk = q.shape[1], k.shape[1]

    # Decode (one query token, every key visible): the split-KV decode kernel on HF's cache as it is.
    decode = sq == 1 and sk > 0 and window_left < 0 and not cap and kernel_takes(q, k, v, q.shape[2], k.shape[2])

    if attention_mask is None:
        if decode:
            return decode_dense(q[:, 0], k, v, _scale(scaling, q))[:, None], None
        return _unmasked(q, k, v, scaling, causal, window, cap), None

    layout = _layout(attention_mask, causal, window_left, sq, sk)
    kind = layout[0]
    if kind == "dense":
        _, qs, qe, ks, ke = layout
        if ks or ke != sk:
            k, v = k.narrow(1, ks, ke - ks), v.narrow(1, ks, ke - ks)   # e.g. the filled part of a static cache
        if qs == 0 and qe == sq:
            if decode and ke > ks:
                return decode_dense(q[:, 0], k, v, _scale(scaling, q))[:, None], None
            return flash_attn_func(q, k, v, softmax_scale=scaling, causal=causal, window_size=window,
                                   softcap=cap), None
        out = q.new_zeros(q.shape)
        if qe > qs:
            out[:, qs:qe] = flash_attn_func(q[:, qs:qe], k, v, softmax_scale=scaling, causal=causal,
                                            window_size=window, softcap=cap)
        return out, None
    if kind == "ragged":
        _, iq, ik, cu_q, cu_k, max_q, max_k = layout
        packed = flash_attn_varlen_func(q[iq], k[ik], v[ik], cu_q, cu_k, max_q, max_k, softmax_scale=scaling,
                                        causal=causal, window_size=window, softcap=cap)
        out = q.new_zeros(q.shape)
        out[iq] = packed
        return out, None
    return _sdpa_fallback(module, query, key, value, attention_mask[..., :sk], scaling, cap), None


def _causal_window(module, is_causal, sliding_window):
    """(causal, window_left, flash-attn window_size) of one HF attention call."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window_left = int(sliding_window) - 1 if sliding_window else -1
    return causal, window_left, (window_left, 0 if causal else -1) if window_left >= 0 else (-1, -1)


def _unmasked(q, k, v, scaling, causal, window, cap):
    """`flash_attn_func` on ``[b, s, h, d]`` views of a call without a mask."""
    sq, sk = q.shape[1], k.shape[1]
    if causal and 1 < sq < sk:
        # HF skips the mask of a prefill into an empty static cache: the keys past the prompt are empty
        # slots, and SDPA's top-left causal mask never reaches them. Bottom-right alignment would.
        k, v = k[:, :sq], v[:, :sq]
    return flash_attn_func(q, k, v, softmax_scale=scaling, causal=causal, window_size=window, softcap=cap)


def _traced_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window, softcap):
    """The attention under torch.compile (HF compiles a static cache's decode step, with CUDA graphs): no
    host sync and no graph break. Decode: the `pagoda::decode_hf` op with the visible keys read from the mask
    on the device. Prefill: `flash_attn_func` (its own custom op) without a mask, exact SDPA with one."""
    if dropout and module.training:
        raise NotImplementedError("pagoda attention is inference-only: dropout is not supported in training mode")
    b, hq, sq, d = query.shape
    hk, sk = key.shape[1], key.shape[2]
    cap = float(softcap) if softcap else 0.0
    decode = (sq == 1 and sk > 0 and key.shape[0] == b and value.shape == key.shape and d % 8 == 0 and d <= 256
              and hk > 0 and hq % hk == 0 and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
              and key.dtype == query.dtype and value.dtype == query.dtype)
    if decode and attention_mask is not None:
        mask = attention_mask[..., :sk]
        decode = mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == sk
    if decode:
        if attention_mask is None:
            # No mask: every key is visible (HF drops the mask only then; a window longer than the cache).
            key_mask = None
            kv_len = torch.full((b,), sk, dtype=torch.int32, device=query.device)
            if sliding_window and sk > int(sliding_window):
                key_mask = (torch.arange(sk, device=query.device) >= sk - int(sliding_window)).expand(b, sk)
        else:
            allowed = mask[:, 0, 0] if mask.dtype == torch.bool else mask[:, 0, 0] == 0
            key_mask = allowed.expand(b, sk)
            # One past the last visible key (0 if none): the keys after it (a static cache's empty slots)
            # are not read at all.
            kv_len = (key_mask * torch.arange(1, sk + 1, device=query.device)).amax(dim=1).to(torch.int32)
        return torch.ops.pagoda.decode_hf(query, key, value, key_mask, kv_len, _scale(scaling, query), cap)
    if attention_mask is None:
        causal, _, window = _causal_window(module, is_causal, sliding_window)
        return _unmasked(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scaling, causal, window,
                         cap)
    return _sdpa_fallback(module, query, key, value, attention_mask[..., :sk], scaling, cap)


# SDPA's own GQA (torch >= 2.5): the keys are not repeated per query head.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa_fallback(module, query, key, value, attention_mask, scaling, softcap):
    """Exact attention under an arbitrary mask (used only for masks that are not padding + causal), ``[b, h, s,
    d]`` in, ``[b, s, hq, d]`` out. GQA without copying the keys per query head. With a soft cap (which SDPA
    lacks) the scores are computed here, as HF's eager attention does: in the inputs' dtype, capped and
    softmaxed in float32; a row whose bool mask hides every key gets zeros."""
    b, hq, sq, d = query.shape
    hk, sk = key.shape[1], key.shape[2]
    groups = hq // hk
    if not softcap:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(query.dtype)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if groups > 1 and not _SDPA_GQA:
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        gqa = {"enable_gqa": True} if groups > 1 and _SDPA_GQA else {}
        out = sdpa(query, key, value, attn_mask=mask, scale=scaling, **gqa)
        return out.transpose(1, 2).contiguous()
    # Query heads h = kv_head * groups + j, so [b, hq, sq, d] -> [b, hk, groups * sq, d] is a view.
    scores = torch.matmul(query.reshape(b, hk, groups * sq, d), key.transpose(-1, -2)).float()
    scores = scores * _scale(scaling, query)
    scores = (torch.tanh(scores / softcap) * softcap).view(b, hk, groups, sq, sk)
    m = attention_mask
    m = m[:, :, None] if m.shape[1] == 1 else m.reshape(m.shape[0], hk, groups, m.shape[2], m.shape[3])
    scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(value.dtype).view(b, hk, groups * sq, sk)
    out = torch.matmul(probs, value).view(b, hq, sq, d)
    return out.transpose(1, 2).contiguous()

"""Custom attention masks of the prefill wrappers: validation, the kernel's layout and tile lists, built in ``plan``.

Users hand FlashInfer's layouts (`pagoda.reference.mask`): ``custom_mask`` (bool, flattened ``[qo_len, kv_len]``
per request, concatenated) or ``packed_custom_mask`` (uint8, each request's mask packed little-endian from a byte
boundary, `pagoda.segment_packbits`). Plan turns either into what the masked paged kernel reads:

* ``words``: int32, one bit per score with every query row starting at a word boundary and padded to
  `ROW_ALIGN` keys, so a program loads ``BLOCK_N / 32`` words per row and tile and shifts (no unaligned bit
  addressing in the kernel). Row ``i`` of request ``b`` is ``words[word_off[b] + i * row_words[b]:]``; bits past
  ``kv_len`` are 0. The sliding window (``window_left``) is folded into the bits here, so the kernel applies one
  mask; ``causal`` is ignored with a custom mask, as in FlashInfer.
* a tile list in CSR form: for every query tile of the kernel (``BLOCK_M`` rows of ``qo_len * group`` GQA-packed
  rows) the key tiles (``BLOCK_N`` keys) in which any of its rows sees a key. The kernel walks only those, so a
  fully masked tile costs neither its K/V reads nor its dot products.

The tile geometry is fixed at plan time (no autotuning of the masked launch): `tile_shape`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagoda.ops import _checks
from pagoda.ops.packbits import packbits, segment_packbits

ROW_ALIGN = 128          # keys per padded mask row: a multiple of every BLOCK_N the masked launch uses
GLUON_TILE = (128, 128)  # (queries, keys) of a tile of the Gluon paged kernel (`pagoda.kernels.hopper.paged`)
_MAX_WORDS = 2 ** 31 - 1  # word offsets are int32 in the kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_shape(max_rows: int, head_dim: int, fp32: bool) -> dict:
    """Launch configuration of the masked kernel (``BLOCK_M``, ``BLOCK_N``, num_warps, num_stages) for requests of
    at most ``max_rows`` GQA-packed rows: the paged kernel's untuned choice (`prefill_paged.default_config`)."""
    from pagoda.kernels.attention.prefill_paged import choose_block_m, default_config

    bm = choose_block_m(max_rows, head_dim, fp32)
    return {"BLOCK_M": bm, **default_config(head_dim, bm, fp32)}


@dataclass(slots=True)
class MaskPlan:
    """A planned custom mask (device tensors the masked kernel reads; shapes in the module docstring)."""
    words: torch.Tensor         # int32 [total words]
    meta: torch.Tensor          # int32 [batch, 3]: word_off, row_words, first query tile of the request
    tile_indptr: torch.Tensor   # int32 [query tiles + 1]
    tile_list: torch.Tensor     # int32 [non-empty tiles]: key-tile index
    config: dict                # BLOCK_M, BLOCK_N, num_warps, num_stages
    packed: torch.Tensor        # the user's mask, segment-packed little-endian (reference path)
    qo_lens: list
    kv_lens: list
    visited: float              # fraction of (query tile, key tile) pairs the kernel reads (the Gluon tiling's
    #                             when it was planned)
    gluon_tiles: tuple | None = None   # (meta, tile_indptr, tile_list) of the Gluon kernel's tiling, or None
    _host: list | None = field(default=None)
    _pages: tuple | None = field(default=None)   # ragged K/V as one-token pages (`ragged_as_pages`), made once

    def host_masks(self) -> list[torch.Tensor]:
        """One bool ``[qo_len, kv_len]`` per request (CPU), for the reference path."""
        if self._host is None:
            from pagoda.reference.mask import unpack_masks

            self._host = unpack_masks(self.packed.cpu(), self.qo_lens, self.kv_lens)
        return self._host


def check_mask_args(custom_mask, packed_custom_mask) -> bool:
    """Types of the two mask arguments (shapes are checked against the lengths in `plan_mask`); True if a mask
    is given."""
    if packed_custom_mask is not None:
        _checks.check_tensor("packed_custom_mask", packed_custom_mask, ndim=1, dtypes=(torch.uint8,))
        return True
    if custom_mask is not None:
        _checks.check_tensor("custom_mask", custom_mask, dtypes=(torch.bool,))
        return True
    return False


def pack_user_mask(custom_mask, packed_custom_mask, qo_lens: list, kv_lens: list, device) -> torch.Tensor:
    """The user's mask as segment-packed little-endian bytes on ``device``; errors name the argument and the
    expected length. ``packed_custom_mask`` wins when both are given (FlashInfer ignores custom_mask then)."""
    sizes = [q * k for q, k in zip(qo_lens, kv_lens)]
    if packed_custom_mask is not None:
        want = sum(_cdiv(n, 8) for n in sizes)
        if packed_custom_mask.shape[0] != want:
            raise ValueError(f"packed_custom_mask must hold sum(ceil(qo_len * kv_len / 8)) = {want} bytes (each "
                             f"request's mask packed from a byte boundary, as segment_packbits(custom_mask, "
                             f"mask_indptr, bitorder='little') makes it), got {packed_custom_mask.shape[0]}")
        return packed_custom_mask.to(device)
    want = sum(sizes)
    if custom_mask.numel() != want:
        raise ValueError(f"custom_mask must hold sum(qo_len * kv_len) = {want} elements (each request's "
                         f"[qo_len, kv_len] mask flattened and concatenated), got {custom_mask.numel()} "
                         f"(shape {tuple(custom_mask.shape)})")
    flat = custom_mask.to(device).contiguous().view(-1)
    if len(sizes) <= 1 or all(n % 8 == 0 for n in sizes):
        return packbits(flat, "little")   # segments already start at byte boundaries
    indptr = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    return segment_packbits(flat, indptr.to(device), "little")[0]


def _words(packed: torch.Tensor, qo_lens, kv_lens, window_left: int, device):
    """Row-aligned int32 words of the mask (window folded in), and per word its request, row and word index."""
    batch = len(qo_lens)
    row_words = [_cdiv(k, ROW_ALIGN) * (ROW_ALIGN // 32) for k in kv_lens]
    counts = [q * w for q, w in zip(qo_lens, row_words)]
    word_off = [0]
    for c in counts:
        word_off.append(word_off[-1] + c)
    if word_off[-1] > _MAX_WORDS:
        raise ValueError(f"custom mask too large: {word_off[-1]} 32-bit words (at most {_MAX_WORDS})")
    byte_off = [0]
    for q, k in zip(qo_lens, kv_lens):
        byte_off.append(byte_off[-1] + _cdiv(q * k, 8))
    lt = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
    req = torch.repeat_interleave(torch.arange(batch, device=device), lt(counts))
    local = torch.arange(word_off[-1], device=device) - lt(word_off[:-1])[req]
    rw = lt(row_words)[req]
    row, w = local // rw, local % rw
    kv = lt(kv_lens)[req]
    qo = lt(qo_lens)[req]
    bit = 8 * lt(byte_off[:-1])[req] + row * kv + 32 * w
    first = bit >> 3
    val = torch.zeros_like(bit)
    n_bytes = packed.shape[0]
    src = packed.to(torch.int64)
    for b in range(5):   # 32 bits starting at any bit offset span at most 5 bytes
        idx = first + b
        val |= torch.where(idx < n_bytes, src[idx.clamp(max=max(n_bytes - 1, 0))] if n_bytes else 0, 0) << (8 * b)
    val = (val >> (bit & 7)) & 0xFFFFFFFF
    keep = (kv - 32 * w).clamp(0, 32)                 # keys of the word that exist
    val &= (torch.ones_like(keep) << keep) - 1
    if window_left >= 0:
        lo = row + kv - qo - window_left - 32 * w     # keys left of the window, in the word
        val &= ~((torch.ones_like(lo) << lo.clamp(0, 32)) - 1)
    return val, req, row, w, row_words, word_off


def _tile_lists(val, req, row, w, qo_lens: list, kv_lens: list, group: int, bm: int, bn: int, device):
    """CSR of the key tiles (``bn`` keys) holding a visible score, per query tile (``bm`` GQA-packed rows of
    ``qo_len * group``): (first query tile per request, tile_indptr, tile_list, fraction of pairs visited)."""
    q_tiles = [_cdiv(q * group, bm) for q in qo_lens]
    tile_base = [0]
    for t in q_tiles:
        tile_base.append(tile_base[-1] + t)
    max_kt = max((_cdiv(k, bn) for k in kv_lens), default=0)
    # Which (query tile, key tile) pairs hold a visible score: every non-zero piece of a word marks the tiles
    # of its row's GQA-packed rows (a query's `group` rows may straddle two query tiles).
    any_tile = torch.zeros(tile_base[-1] * max(max_kt, 1), dtype=torch.bool, device=device)
    base = torch.tensor(tile_base[:-1], dtype=torch.int64, device=device)[req]
    first_t, last_t = (row * group) // bm, ((row + 1) * group - 1) // bm
    pieces = [(val, 32 * w // bn)] if bn >= 32 else [
        ((val >> (s * bn)) & ((1 << bn) - 1), (32 * w + s * bn) // bn) for s in range(32 // bn)]
    for part, kt in pieces:
        hit = part != 0
        for extra in range(group // bm + 2 if group > 1 else 1):
            qt = first_t + extra
            sel = hit & (qt <= last_t)
            any_tile[((base + qt) * max_kt + kt)[sel]] = True
    any_tile = any_tile.view(tile_base[-1], max(max_kt, 1))[:, :max_kt]
    tile_indptr = torch.zeros(tile_base[-1] + 1, dtype=torch.int32, device=device)
    tile_indptr[1:] = torch.cumsum(any_tile.sum(1), 0)
    tile_list = any_tile.nonzero()[:, 1].to(torch.int32)
    total = sum(t * _cdiv(k, bn) for t, k in zip(q_tiles, kv_lens))
    return tile_base, tile_indptr, tile_list, (tile_list.numel() / total if total else 0.0)


def _meta(word_off: list, row_words: list, tile_base: list, device) -> torch.Tensor:
    """int32 ``[batch, 3]``: each request's word offset, words a row, first query tile."""
    return torch.tensor([[word_off[b], row_words[b], tile_base[b]] for b in range(len(row_words))],
                        dtype=torch.int32).reshape(-1, 3).to(device)


def plan_mask(custom_mask, packed_custom_mask, qo_lens: list, kv_lens: list, group: int, head_dim: int,
              fp32: bool, window_left: int, device, gluon: bool = False) -> MaskPlan:
    """Build the kernel's view of a custom mask for a batch with host lengths ``qo_lens``/``kv_lens``.
    ``gluon``: also the tile lists of the Gluon sm_90 paged kernel (`GLUON_TILE`, one query head a program)."""
    packed = pack_user_mask(custom_mask, packed_custom_mask, qo_lens, kv_lens, device)
    config = tile_shape(max(qo_lens, default=1) * group, head_dim, fp32)
    val, req, row, w, row_words, word_off = _words(packed, qo_lens, kv_lens, window_left, device)
    tile_base, tile_indptr, tile_list, visited = _tile_lists(val, req, row, w, qo_lens, kv_lens, group,
                                                             config["BLOCK_M"], config["BLOCK_N"], device)
    gluon_tiles = None
    if gluon:
        g_base, g_indptr, g_list, visited = _tile_lists(val, req, row, w, qo_lens, kv_lens, 1, *GLUON_TILE, device)
        gluon_tiles = (_meta(word_off, row_words, g_base, device), g_indptr, g_list)
    words = torch.where(val >= 2 ** 31, val - 2 ** 32, val).to(torch.int32)
    return MaskPlan(words=words, meta=_meta(word_off, row_words, tile_base, device), tile_indptr=tile_indptr,
                    tile_list=tile_list, config=config, packed=packed, qo_lens=list(qo_lens),
                    kv_lens=list(kv_lens), visited=visited, gluon_tiles=gluon_tiles)


def plan_for_wrapper(custom_mask, packed_custom_mask, qo_lens: list, kv_lens: list, group: int, head_dim: int,
                     q_dtype: torch.dtype, window_left: int, device, use_cuda_graph: bool,
                     gluon: bool = False) -> MaskPlan | None:
    """A prefill wrapper's plan step: None without a mask; NotImplementedError for a mask under CUDA graphs (the
    tile lists are sized per plan, so a captured launch could not replay them)."""
    if not check_mask_args(custom_mask, packed_custom_mask):
        return None
    if use_cuda_graph:
        raise NotImplementedError("custom_mask / packed_custom_mask with use_cuda_graph=True are not supported "
                                  "(plan the masked batch on a wrapper without CUDA graphs)")
    return plan_mask(custom_mask, packed_custom_mask, qo_lens, kv_lens, group, head_dim, q_dtype == torch.float32,
                     window_left, device, gluon)


def _ref_opts(opts: dict) -> dict:
    """The plan options the masked reference takes (``causal`` does not apply with a custom mask)."""
    return {k: v for k, v in opts.items() if k != "causal"}


def reference_paged(q, paged_kv_cache, host_meta, kv_layout: str, plan: MaskPlan, opts: dict):
    """Reference path of the paged wrapper with a mask: ``(out, lse)`` as the kernel path gives them (natural log)."""
    from pagoda.reference.mask import batch_masked_prefill
    from pagoda.reference.page import gather_paged_kv

    qo_indptr, kv_indptr, kv_indices, kv_last = host_meta
    kv = gather_paged_kv(paged_kv_cache, kv_indptr, kv_indices, kv_last, kv_layout)
    return batch_masked_prefill(q, kv, qo_indptr, plan.host_masks(), **_ref_opts(opts))


def reference_ragged(q, k, v, qo_indptr: list, kv_indptr: list, plan: MaskPlan, opts: dict):
    """Reference path of ragged K/V ``[nnz_kv, Hk, D]`` with a mask: ``(out, lse)`` (natural log)."""
    from pagoda.reference.mask import batch_masked_prefill

    kv = [(k[a:b], v[a:b]) for a, b in zip(kv_indptr, kv_indptr[1:])]
    return batch_masked_prefill(q, kv, torch.tensor(qo_indptr), plan.host_masks(), **_ref_opts(opts))


def ragged_as_pages(kv_indptr: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged K/V seen as a paged cache of one-token pages (token ``t`` is page ``t``): ``(kv_indptr, kv_indices,
    kv_last_page_len)`` for the paged kernel, so ragged and paged masks share one kernel."""
    n = kv_indptr.shape[0] - 1
    total = int(kv_indptr[-1]) if n >= 0 else 0
    return (kv_indptr.to(device=device, dtype=torch.int32), torch.arange(total, dtype=torch.int32, device=device),
            torch.ones(n, dtype=torch.int32, device=device))


def run_ragged(q, k, v, plan: MaskPlan, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, num_kv_heads: int,
               opts: dict, alibi_slopes, out: torch.Tensor | None, lse: torch.Tensor | None):
    """Masked attention of ``q [>= nnz_qo, Hq, D]`` against ragged ``k``/``v`` ``[>= nnz_kv, Hk, D]`` (token-major
    views; ragged by the int32 device indptrs). Writes and returns ``(out, lse)``: out like q, lse float32
    ``[q rows, Hq]`` natural log; rows past ``qo_indptr[-1]`` get zeros / -inf. Kernel path: the paged kernel
    over one-token pages (`ragged_as_pages`)."""
    from pagoda.ops import _paged

    hq = q.shape[1]
    if out is None:
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.full((q.shape[0], hq), float("-inf"), dtype=torch.float32, device=q.device)
    if not _paged.use_triton(q):
        o, l = reference_ragged(q, k, v, qo_indptr.tolist(), kv_indptr.tolist(), plan, opts)
        return out.copy_(o), lse.copy_(l)
    from pagoda.ops._dispatch import prefill_paged

    nnz = sum(plan.qo_lens)
    if q.shape[0] > nnz:    # the kernel writes rows below qo_indptr[-1] only
        out[nnz:].zero_()
        lse[nnz:].fill_(float("-inf"))
    if plan._pages is None:
        plan._pages = ragged_as_pages(kv_indptr, q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    kc, vc = k[:, None], v[:, None]
    mode = opts["pos_encoding_mode"]
    prefill_paged(q, kc, vc, _paged.cache_strides(kc, "NHD"), _paged.cache_strides(vc, "NHD"), qo_indptr,
                  *plan._pages, 1, num_kv_heads, max(plan.qo_lens, default=0), out, lse,
                  sm_scale=opts["sm_scale"], causal=False, logits_soft_cap=opts["logits_soft_cap"],
                  alibi_slopes=alibi_slopes if mode == "ALIBI" else None, alibi_signed=True,
                  rope=(opts["rope_scale"], opts["rope_theta"]) if mode == "ROPE_LLAMA" else None, custom_mask=plan)
    return out, lse


def run_single(q, k, v, kv_layout: str, custom_mask, packed_custom_mask, opts: dict):
    """`single_prefill_with_kv_cache` with a mask: q ``[qo_len, Hq, D]``, k/v in ``kv_layout``, the mask
    ``[qo_len, kv_len]`` (any shape with that many elements) or its packed bytes. Returns ``(out, lse)``,
    natural log."""
    from pagoda.reference.decode import alibi_slopes

    if kv_layout == "HND":
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    qo_len, hq, d = q.shape
    kv_len, hk = k.shape[0], k.shape[1]
    plan = plan_mask(custom_mask, packed_custom_mask, [qo_len], [kv_len], hq // hk, d, q.dtype == torch.float32,
                     opts["window_left"], q.device)
    dev = q.device
    qo_indptr = torch.tensor([0, qo_len], dtype=torch.int32, device=dev)
    kv_indptr = torch.tensor([0, kv_len], dtype=torch.int32, device=dev)
    slopes = alibi_slopes(hq, device=dev) if opts["pos_encoding_mode"] == "ALIBI" else None
    return run_ragged(q, k, v, plan, qo_indptr, kv_indptr, hk, opts, slopes, None, None)

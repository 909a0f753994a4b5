"""Which kernel serves an attention call, and with which launch configuration.

The ops validate their arguments and then call here; the kernel modules only launch what they are given.

- Dense and ragged attention (`attention_fwd`): the warp-specialised Gluon kernel on sm_90 where it applies
  (dense, fp16/bf16, head_dim 64/128, causal or full, no window / ALiBi / soft cap:
  `hopper.attention.hopper_supported`) unless ``PAGODA_HOPPER_ATTN=0``; the Triton kernel otherwise.
- Paged prefill (`prefill_paged`): the paged Gluon kernel on sm_90 for batches whose longest request has at least
  `GLUON_MIN_QO` queries and that it supports (`hopper.paged.paged_supported`), same switch; the Triton paged
  kernel otherwise, whose GQA row packing suits short, decode-like requests. Custom masks follow the same rule when
  the plan built the Gluon kernel's tile lists (`masked_gluon_planned`, with ``PAGODA_MASKED_GLUON``), else take
  the Triton kernel.
- Triton launch configurations: autotuned at the first call of a shape class, or fixed (`default_config`) with
  ``PAGODA_AUTOTUNE=0``, and small tiles in the interpreter.

Everything here runs on CUDA tensors, or CPU tensors under the interpreter (tests).
"""
from __future__ import annotations

import torch

from pagoda import _switches

# Requests with at least this many queries (max over the batch) take the paged Gluon kernel where it applies;
# shorter, decode-like batches keep the Triton kernel's GQA row packing (several query heads per tile).
GLUON_MIN_QO = 128


def masked_gluon_planned(q_dtype: torch.dtype, head_dim: int, page_size: int, max_qo_len: int, device,
                         logits_soft_cap: float, pos_encoding_mode: str) -> bool:
    """Whether a masked paged prefill plan should also build the Gluon kernel's tiling: the call could take it
    (sm_90, Gluon importable, fp16/bf16, head_dim 64/128, a page size it boxes, no soft cap / ALiBi / RoPE,
    requests of at least `GLUON_MIN_QO` queries). The cache layout is checked again at run."""
    if (max_qo_len < GLUON_MIN_QO or _switches.interpreting() or not _switches.hopper_attention()
            or not _switches.masked_gluon() or torch.device(device).type != "cuda"):
        return False
    from pagoda.kernels.hopper import gluon
    from pagoda.kernels.hopper import paged as hopper_paged

    if not gluon.GLUON_OK or hopper_paged.options_unsupported(
            q_dtype, head_dim, page_size, logits_soft_cap=logits_soft_cap, alibi=pos_encoding_mode == "ALIBI",
            rope=pos_encoding_mode == "ROPE_LLAMA") is not None:
        return False
    index = torch.device(device).index
    return gluon.is_sm90(index if index is not None else torch.cuda.current_device())


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None,
                  *, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int,
                  batch_size: int, softmax_scale: float, window_left: int, window_right: int, softcap: float,
                  alibi_slopes: torch.Tensor | None, alibi_signed: bool = False) -> None:
    """Dense or varlen attention forward into ``out`` / ``lse`` (shapes: `pagoda.kernels.attention.fwd`).
    ``alibi_signed``: FlashInfer's ALiBi form (``slope * (pos_k - pos_q)``) instead of flash-attn's."""
    from pagoda.kernels.attention import fwd

    interpreting = _switches.interpreting()
    if (cu_seqlens_q is None and window_left < 0 and window_right in (-1, 0) and not interpreting
            and _switches.hopper_attention()):
        from pagoda.kernels.hopper import attention as hopper

        if hopper.hopper_supported(q, k, v, out, window_left=window_left, window_right=window_right,
                                   softcap=softcap, alibi_slopes=alibi_slopes):
            hopper.attention_fwd_hopper(q, k, v, out, lse, softmax_scale, causal=window_right == 0)
            return
    if interpreting:
        config = fwd.INTERPRETER_CONFIG
    elif not _switches.autotune():
        config = fwd.default_config(q.shape[-1], fwd.tma_supported(k, v))
    else:
        config = None
    fwd.attention_fwd(q, k, v, out, lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      max_seqlen_q=max_seqlen_q, batch_size=batch_size, softmax_scale=softmax_scale,
                      window_left=window_left, window_right=window_right, softcap=softcap,
                      alibi_slopes=alibi_slopes, config=config, alibi_signed=alibi_signed)


def prefill_paged(q, k_cache, v_cache, k_strides, v_strides, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                  page_size: int, num_kv_heads: int, max_qo_len: int, out, lse, *, sm_scale: float, causal: bool,
                  window_left: int = -1, logits_soft_cap: float = 0.0, alibi_slopes=None, rope=None,
                  window_right: int | None = None, block_m: int | None = None, num_splits: int = 0, chunk=None,
                  o_part=None, lse_part=None, write_lse: bool = True, custom_mask=None,
                  alibi_signed: bool = False, allow_gluon: bool = True) -> None:
    """Paged prefill into ``out`` / ``lse`` (arguments: `pagoda.kernels.attention.prefill_paged.prefill_paged_fwd`).

    ``allow_gluon=False`` keeps the call on the Triton kernel.

    ``write_lse=False``: the caller does not read lse (the Gluon kernel then skips it; the Triton kernels write it
    regardless). ``block_m`` is the Triton kernel's rows per tile (unused by the Gluon kernel). A ``custom_mask``
    (`pagoda.ops._mask.MaskPlan`) takes the Gluon kernel when it holds that kernel's tiling and the call is in its
    scope, else the Triton kernel with the launch configuration it was planned for."""
    from pagoda.kernels.attention import prefill_paged as paged

    if qo_indptr.shape[0] <= 1 or max_qo_len == 0 or q.shape[0] == 0:
        return
    if window_right is None:
        window_right = 0 if causal else -1
    interpreting = _switches.interpreting()
    masked = custom_mask is not None
    if (allow_gluon and max_qo_len >= GLUON_MIN_QO and not interpreting and _switches.hopper_attention()
            and (custom_mask.gluon_tiles is not None if masked else window_right <= 0)):
        from pagoda.kernels.hopper import paged as hopper_paged

        # A mask holds the window in its bits: the kernel sees none.
        if hopper_paged.paged_supported(q, k_cache, v_cache, k_strides, v_strides, page_size, num_kv_heads,
                                        window_left=-1 if masked else window_left,
                                        window_right=-1 if masked else window_right,
                                        logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, rope=rope,
                                        num_splits=0 if masked else num_splits):
            hopper_paged.prefill_paged_hopper(q, k_cache, v_cache, k_strides, v_strides, qo_indptr, kv_indptr,
                                              kv_indices, kv_last_page_len, page_size, num_kv_heads, max_qo_len, out,
                                              lse if write_lse else None, sm_scale=sm_scale,
                                              causal=window_right == 0 and not masked, custom_mask=custom_mask)
            return
    config = None
    if interpreting or not _switches.autotune():
        fp32 = q.dtype == torch.float32
        group = q.shape[1] // num_kv_heads
        block_m = block_m or paged.choose_block_m(max_qo_len * group, q.shape[2], fp32)
        config = paged.default_config(q.shape[2], block_m, fp32)
    paged.prefill_paged_fwd(q, k_cache, v_cache, k_strides, v_strides, qo_indptr, kv_indptr, kv_indices,
                            kv_last_page_len, page_size, num_kv_heads, max_qo_len, out, lse, sm_scale=sm_scale,
                            causal=causal, window_left=window_left, logits_soft_cap=logits_soft_cap,
                            alibi_slopes=alibi_slopes, rope=rope, window_right=window_right, config=config,
                            block_m=block_m, num_splits=num_splits, chunk=chunk, o_part=o_part, lse_part=lse_part,
                            custom_mask=custom_mask, alibi_signed=alibi_signed)

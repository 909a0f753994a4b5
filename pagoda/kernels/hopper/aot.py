"""Ahead-of-time compilation of the Gluon sm_90 attention kernels (`ws`, `pws`, `paged`) for a named config, on any
machine (no GPU needed): the compile tests read shared memory, register budgets,
PTX and SASS from it (`tests/kernels/test_attention_hopper_compile.py`)."""
from __future__ import annotations

import torch

from pagoda.kernels.hopper import configs as C
from pagoda.kernels.hopper.gluon import smem_layout


def compile_sm90(head_dim: int, dtype: str = "bf16", causal: bool = True, config: str | None = None,
                 write_lse: bool = True):
    """Compile the kernel ahead of time for sm_90 (works on a CPU-only machine). Returns the CompiledKernel
    (``.metadata.shared``, ``.n_regs``/``.n_spills`` are filled only after loading on a GPU). Launch options
    as `attention.attention_fwd_hopper` (4 warps + partitions, maxnreg per consumer count)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    config = config or C.DEFAULT_CONFIG[head_dim, bool(causal)]
    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    persistent = C.ws_persistent(config)
    if persistent:
        from pagoda.kernels.hopper.pws import _attn_fwd_hopper_pws_kernel as fn
    else:
        from pagoda.kernels.hopper.ws import _attn_fwd_hopper_ws_kernel as fn
    bm, bn, stages, regs, pingpong, nc, maxnreg = C.ws_params(config, head_dim)
    q_rows, warps, options = 64, 4, {"num_warps": 4, "maxnreg": maxnreg}

    def desc_sig(rows):
        block = (1, rows, head_dim)
        return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{smem_layout(block, tdt)!r}>"

    sig = {"q_desc": desc_sig(q_rows), "k_desc": desc_sig(bn), "v_desc": desc_sig(bn), "o_desc": desc_sig(q_rows),
           "LSE": "*fp32", "stride_lb": "i32", "stride_lh": "i32", "stride_lt": "i32", "seqlen_q": "i32",
           "seqlen_k": "i32", "group_size": "i32", "qk_scale": "fp32"}
    if persistent:  # the persistent kernels also take num_heads, num_items
        sig = {**{n: t for n, t in sig.items() if n != "qk_scale"}, "num_heads": "i32", "num_items": "i32",
               "qk_scale": "fp32"}
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": bm, "BLOCK_N": bn, "STAGES": stages, "CAUSAL": causal,
              "WRITE_LSE": write_lse, "num_warps": warps, "CONSUMER_REGS": regs, "PINGPONG": pingpong,
              "NUM_CONSUMERS": nc}
    for name in consts:
        sig[name] = "constexpr"
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_paged_sm90(head_dim: int, dtype: str = "bf16", causal: bool = True, box: int = 16,
                       pingpong: bool = False, o_tma: bool = True, write_lse: bool = True, custom_mask: bool = False):
    """Compile the paged Gluon prefill (`paged`) ahead of time for sm_90, boxes of ``box``
    cache rows (a page size of 16, 32, 64, or 128 for larger pages); ``custom_mask`` the masked variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from pagoda.kernels.hopper import paged as P

    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16

    def desc_sig(rows):
        block = (rows, head_dim)
        return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{smem_layout(block, tdt)!r}>"

    sig = {"q_desc": desc_sig(64), "k_desc": desc_sig(box), "v_desc": desc_sig(box), "o_desc": desc_sig(64),
           "O": f"*{dtype}",
           "LSE": "*fp32", "QO_INDPTR": "*i32", "KV_INDPTR": "*i32", "KV_INDICES": "*i32", "KV_LAST": "*i32",
           "MASK_WORDS": "*i32", "MASK_META": "*i32", "TILE_INDPTR": "*i32", "TILE_LIST": "*i32"}
    for name in ("stride_ot", "stride_oh", "stride_lt", "stride_lh", "page_size", "rows_per_page",
                 "rows_per_head", "cols_per_head", "group_size"):
        sig[name] = "i32"
    sig["qk_scale"] = "fp32"
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": P.BLOCK_M, "BLOCK_N": P.BLOCK_N, "BOX": box, "STAGES": P.STAGES,
              "CAUSAL": causal, "CONSUMER_REGS": P.CONSUMER_REGS, "PINGPONG": pingpong, "O_TMA": o_tma,
              "WRITE_LSE": write_lse, "CUSTOM_MASK": custom_mask, "num_warps": 4}
    for name in consts:
        sig[name] = "constexpr"
    src = GluonASTSource(fn=P._paged_prefill_ws_kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": P.MAXNREG})

"""Compile the attention kernels for an H100/H200 (sm_90) ahead of time, on the CPU.

The interpreter skips Triton's type checks and lowering; this catches kernels that run in the
interpreter but would not compile for the GPU (no GPU needed: Triton's bundled ptxas).
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_AOT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pagoda.kernels.attention import fwd as A
from pagoda.kernels.attention import decode as D
from pagoda.kernels.attention import prefill_paged as P
from pagoda.kernels.attention import merge as M

def build(fn, consts, ptrs, warps=4, stages=3):
    names = [n for n in fn.arg_names if n not in consts]
    sig = {n: ptrs.get(n, "i32") for n in names}
    for n in ("qk_scale", "softcap_log2", "rope_rcp_scale", "log2_theta"):
        if n in sig:
            sig[n] = "fp32"
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps, "num_stages": stages})

bf = dict.fromkeys(["Q", "K", "V", "O"], "*bf16")
f32 = dict.fromkeys(["LSE", "SLOPES"], "*fp32")
i32 = dict.fromkeys(["CU_SEQLENS_Q", "CU_SEQLENS_K", "KV_INDPTR", "KV_INDICES", "KV_LAST", "QO_INDPTR", "CHUNK"],
                    "*i32")
ptrs = {**bf, **f32, **i32}
for varlen, causal, extra in ((False, False, False), (True, True, True)):
    for tma in (False, True):
        build(A._attn_fwd_kernel, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_M=128, BLOCK_N=128 if tma else 64,
                                       IS_VARLEN=varlen, HAS_LEFT=extra, HAS_RIGHT=causal, HAS_SOFTCAP=extra,
                                       HAS_ALIBI=extra, WRITE_LSE=True, USE_TMA=tma), ptrs, warps=8)
# The key-mask variant: HF's compiled static-cache decode (one page per request, split, fused merge).
for split, opts, fused, key_mask in ((False, False, False, False), (True, True, False, False),
                                     (True, False, True, False), (True, False, True, True)):
    build(D._decode_kernel, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, GROUP_PAD=16, BLOCK_N=64, SPLIT=split,
                                 HAS_WINDOW=opts, HAS_SOFTCAP=opts, HAS_ALIBI=opts, ROPE=opts, IEEE=False,
                                 FUSED_MERGE=fused, ADDR=3 if fused else (4 if opts else 0), WHOLE_TILES=fused,
                                 HAS_KEY_MASK=key_mask),
          {**ptrs, "O": "*fp32" if split else "*bf16", "COUNTER": "*i32", "OUT_F": "*bf16", "LSE_F": "*fp32",
           "KEY_MASK": "*u8"})
# Paged prefill: the long-prefill tile (128 rows, GQA 4), a 64-row split variant and the decode-like
# 16-row split tile with every option; split variants write float32 partial states.
for bm, group, split, opts, warps in ((128, 4, False, False, 8), (64, 1, True, False, 4), (16, 4, True, True, 4)):
    build(P._prefill_paged_kernel, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, GROUP=group, BLOCK_M=bm, BLOCK_N=64,
                                        SPLIT=split, CAUSAL=not opts, HAS_WINDOW=opts, HAS_SOFTCAP=opts,
                                        HAS_ALIBI=opts, ROPE=opts, IEEE=False, ADDR=3 if opts else 4,
                                        CUSTOM_MASK=False),
          {**ptrs, "O": "*fp32"} if split else ptrs, warps=warps)
# Custom masks: the tile-list loop and the mask bits (the long-prefill tile; a decode-like tile with options).
mask_ptrs = {**ptrs, **dict.fromkeys(["MASK_WORDS", "MASK_META", "TILE_INDPTR", "TILE_LIST"], "*i32")}
for bm, opts, warps in ((128, False, 8), (16, True, 4)):
    build(P._prefill_paged_kernel, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, GROUP=4, BLOCK_M=bm, BLOCK_N=64, SPLIT=False,
                                        CAUSAL=False, HAS_WINDOW=False, HAS_SOFTCAP=opts, HAS_ALIBI=2 if opts else 0,
                                        ROPE=opts, IEEE=False, ADDR=3, CUSTOM_MASK=True), mask_ptrs, warps=warps)
build(P._merge_splits_kernel, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, SPLITS_PAD=16),
      {"O_PART": "*fp32", "LSE_PART": "*fp32", "QO_INDPTR": "*i32", "O": "*bf16", "LSE": "*fp32"})
mp = {"O": "*bf16", "V": "*bf16", "V_B": "*bf16", "S": "*fp32", "S_B": "*fp32", "LSE": "*fp32", "MASK": "*i1"}
for two in (False, True):
    build(M._merge_states_kernel, dict(BLOCK_D=128, HAS_MASK=two, TWO_TENSORS=two, BASE2=two), mp)
print("COMPILED")
'''


def test_attention_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("no ptxas bundled with this triton")
    assert r.returncode == 0 and "COMPILED" in r.stdout, r.stderr[-3000:]

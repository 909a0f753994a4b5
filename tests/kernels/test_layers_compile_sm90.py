"""Compile the layer kernels (RMSNorm, gated activations) for an H100/H200 (sm_90) ahead of time, on the CPU:
the interpreter skips Triton's type checks and lowering, this does not (Triton's bundled ptxas, no GPU)."""
import pytest

from tests.helpers import run_aot_script

pytest.importorskip("triton")

_AOT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pagoda.kernels.layers import activation as A
from pagoda.kernels.layers import norm as N

def build(fn, consts, ptrs, warps):
    names = [n for n in fn.arg_names if n not in consts]
    sig = {n: ptrs.get(n, "i32") for n in names}
    if "eps" in sig:
        sig["eps"] = "fp32"
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps})

# bf16: every tile shape the launch configuration picks at the engine's sizes, and the chunked long-row path;
# fp16 / fp32: one of each kernel (the dtype only changes the loads, stores and casts).
for dt in ("bf16", "fp16", "fp32"):
    ptrs = dict.fromkeys(["X", "R", "W", "OUT"], "*" + dt)
    every = ((1, 4096), (4096, 1024), (7, 8192), (1, 16384), (1, 20000), (64, 128))
    for rows, hidden in every if dt == "bf16" else ((4096, 1024),):
        block_r, block_h, one_tile, warps = N._config(rows, hidden)
        for fused, gemma in ((False, False), (True, False), (False, True), (True, True))[: 4 if dt == "bf16" else 2]:
            consts = dict(BLOCK_R=block_r, BLOCK_H=block_h, ONE_TILE=one_tile, FUSED_ADD=fused, GEMMA=gemma)
            if rows > 64:
                consts["inner"] = 1          # what Triton makes of a contiguous batch (inner == 1)
            build(N._rmsnorm_kernel, consts, ptrs, warps)
    for rows, d in ((1, 14336), (4096, 14336), (97, 64)) if dt == "bf16" else ((4096, 14336),):
        block_r, block_c, warps = A._config(rows, d)
        for act in (0, 1, 2) if dt == "bf16" else (0,):
            build(A._act_and_mul_kernel, dict(BLOCK_R=block_r, BLOCK_C=block_c, ACT=act),
                  {"X": "*" + dt, "OUT": "*" + dt}, warps)
print("COMPILED")
'''


def test_layer_kernels_compile_for_sm90():
    run_aot_script(_AOT)

"""The instruction mix of the paged prefill kernels' loops on sm_90, compiled on any machine (no GPU needed).

    python3 benchmarks/sass_loops.py                      # Triton kernel, unmasked and custom mask, bf16, d 128
    python3 benchmarks/sass_loops.py --head-dim 64 --group 8
    python3 benchmarks/sass_loops.py --gluon              # the Gluon kernel (`compile_paged_sm90`), both variants

Triton compiles `pagoda.kernels.attention.prefill_paged._prefill_paged_kernel` for an sm_90 target with the
launch configuration the custom-mask path uses (`pagoda.ops._mask.tile_shape`) and the integer arguments that
are multiples of 16 marked so (as Triton's launcher specialises them: pointers, the cache's and q's strides,
the page size), disassembles the cubin with the ``cuobjdump`` Triton ships, and prints, for every loop (a
backward branch), its length in instructions and the most frequent opcodes. A loop's length is what one
thread issues per key tile, so two variants of a kernel compare per tile without timing anything; whether
issue or latency bounds the kernel is a question for the GPU. With ``--gluon`` the kernel is the Gluon paged
prefill (page 16, non-causal), whose consumer loops are the innermost ones holding HGMMA instructions.
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "SLOPES": "*fp32",
             "CHUNK": "*i32", "QO_INDPTR": "*i32", "KV_INDPTR": "*i32", "KV_INDICES": "*i32", "KV_LAST": "*i32",
             "MASK_WORDS": "*i32", "MASK_META": "*i32", "TILE_INDPTR": "*i32", "TILE_LIST": "*i32"}
_FLOATS = {"qk_scale", "softcap_log2", "rope_rcp_scale", "log2_theta"}
_NOT_16 = {"stride_lh", "stride_ls", "stride_os", "stride_sb"}   # 1 or 0 at the engine's shapes


def compile_kernel(custom_mask: bool, head_dim: int, group: int, page_size: int = 16):
    """The compiled kernel (Triton's ``CompiledKernel``) for an sm_90 target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagoda.kernels.attention import prefill_paged as pp
    from pagoda.ops._mask import tile_shape

    cfg = tile_shape(4096 * group, head_dim, False)
    row = group * head_dim
    strides = (page_size * row, row, head_dim)
    const = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, GROUP=group, BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_N=cfg["BLOCK_N"], SPLIT=False, CAUSAL=False, HAS_WINDOW=False, HAS_SOFTCAP=False,
                 HAS_ALIBI=0, ROPE=False, IEEE=False, ADDR=pp.addr_flags(page_size, strides, strides),
                 CUSTOM_MASK=custom_mask)
    names = pp._prefill_paged_kernel.arg_names
    sig = {n: "constexpr" if n in const else _POINTERS.get(n, "fp32" if n in _FLOATS else "i32") for n in names}
    div = [i for i, n in enumerate(names) if n in _POINTERS or n == "page_size"
           or (n.startswith("stride_") and n not in _NOT_16)]
    src = ASTSource(fn=pp._prefill_paged_kernel, signature=sig,
                    constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in div})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}), cfg


def loops(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """(start, end, opcode counts) of every loop: the span from a backward branch's target to the branch."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    out = []
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            ops = collections.Counter(re.sub(r"^@!?U?P[T0-9]+\s+", "", t).split()[0].split(".")[0]
                                      for a, t in ins if start <= a <= addr)
            out.append((start, addr, ops))
    return out


def innermost(found: list) -> list:
    """The loops of `loops` that hold no other (a kernel's hot loops; warp-specialised kernels also branch back
    over whole partitions)."""
    return [(a, b, ops) for a, b, ops in found
            if not any((a2, b2) != (a, b) and a <= a2 and b2 <= b for a2, b2, _ in found)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--gluon", action="store_true", help="the Gluon sm_90 paged kernel instead of the Triton one")
    args = ap.parse_args(argv)
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for custom in (False, True):
        if args.gluon:
            from pagoda.kernels.hopper.aot import compile_paged_sm90

            kernel, cfg = compile_paged_sm90(args.head_dim, causal=False, custom_mask=custom), "Gluon paged, page 16"
        else:
            kernel, cfg = compile_kernel(custom, args.head_dim, args.group)
        cubin = Path("/tmp") / f"pagoda-prefill-paged-{'gluon-' if args.gluon else ''}{int(custom)}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        print(f"{'custom mask' if custom else 'unmasked'} (triton {triton.__version__}, sm_90, {cfg}):")
        for start, end, ops in innermost(loops(sass)):
            if args.gluon and not ops["HGMMA"]:
                continue                    # the loader's and the barrier-waiting loops
            top = " ".join(f"{k} {v}" for k, v in ops.most_common(24))
            print(f"  loop {start:#06x}-{end:#06x}: {sum(ops.values())} instructions; {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Paged decode and paged prefill on the GPU, beside their peers on the same data (measurement aid).

Decode (bf16, 32 query / 8 KV heads, head_dim 128, pages in random order): pagoda's
BatchDecodeWithPagedKVCacheWrapper at page size 16 and 1, FlashInfer's wrapper (tensor cores on and
off, when importable) and cuDNN SDPA on the same KV laid out contiguously. Reported as TB/s of KV read
(every key and value read once). Paged prefill: pagoda's paged wrapper vs pagoda's dense varlen kernel
on the same shapes (ratio), causal.
Run on the GPU machine: PYTHONPATH=$PWD python3 benchmarks/paged_decode.py [--quick] [--json PATH]
"""
import json
import sys

import torch
import triton.testing
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pagoda
from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper
from pagoda.ops.prefill import BatchPrefillWithPagedKVCacheWrapper

HQ, HK, D, DT = 32, 8, 128, torch.bfloat16
DEC = [(16, 4096), (64, 4096), (256, 4096), (1, 4096), (1, 32768), (1, 131072)]
PRE = [(8, 1024), (2, 4096), (1, 16384)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def paged(batch, ctx, ps):
    pages = batch * (-(-ctx // ps))
    perm = torch.randperm(pages, device="cuda").to(torch.int32)
    indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * (pages // batch)
    last = torch.full((batch,), ctx - (pages // batch - 1) * ps, dtype=torch.int32, device="cuda")
    cache = torch.randn(pages, 2, ps, HK, D, dtype=DT, device="cuda")
    return cache, perm, indptr, last


def contiguous(cache, perm, indptr, batch, ctx, ps):
    """The same keys/values, request-major and contiguous ([b, h, s, d]) for SDPA."""
    k = cache[perm.long(), 0].reshape(batch, -1, HK, D)[:, :ctx].transpose(1, 2).contiguous()
    v = cache[perm.long(), 1].reshape(batch, -1, HK, D)[:, :ctx].transpose(1, 2).contiguous()
    return k, v


def decode_row(batch, ctx):
    kv_bytes = 2 * batch * ctx * HK * D * 2
    q = torch.randn(batch, HQ, D, dtype=DT, device="cuda")
    row = {"batch": batch, "ctx": ctx}
    for ps in (16, 1):
        cache, perm, indptr, last = paged(batch, ctx, ps)
        w = BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
        w.plan(indptr, perm, last, HQ, HK, D, ps, q_data_type=DT)
        out = w.run(q, cache)
        row[f"pagoda_p{ps}"] = kv_bytes / bench(lambda: w.run(q, cache)) / 1e9
        if ps == 16:
            k, v = contiguous(cache, perm, indptr, batch, ctx, ps)
            qs = q[:, :, None]
            ref = F.scaled_dot_product_attention(qs, k.repeat_interleave(HQ // HK, 1),
                                                 v.repeat_interleave(HQ // HK, 1))[:, :, 0]
            row["rel_err"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            try:
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    row["cudnn"] = kv_bytes / bench(
                        lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)) / 1e9
            except RuntimeError:
                row["cudnn"] = float("nan")
            try:
                import flashinfer
                for tc in (False, True):
                    fw = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                        torch.empty(256 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=tc)
                    fw.plan(indptr, perm, last, HQ, HK, D, ps, q_data_type=DT, kv_data_type=DT)
                    row[f"flashinfer_tc{int(tc)}"] = kv_bytes / bench(lambda: fw.run(q, cache)) / 1e9
            except Exception as e:  # noqa: BLE001 - peer absent or failing: report, keep going
                row["flashinfer"] = f"unavailable: {type(e).__name__}"
    return row


def prefill_row(batch, s):
    q = torch.randn(batch * s, HQ, D, dtype=DT, device="cuda")
    cache, perm, indptr, last = paged(batch, s, 16)
    k, v = (t.transpose(1, 2).reshape(batch * s, HK, D).contiguous() for t in contiguous(cache, perm, indptr,
                                                                                           batch, s, 16))
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * s
    w = BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(cu, indptr, perm, last, HQ, HK, D, 16, causal=True, q_data_type=DT)
    out = w.run(q, cache)
    dense = pagoda.flash_attn_varlen_func(q, k, v, cu, cu, s, s, causal=True)
    flops = 4 * batch * s * s * HQ * D / 2
    t_paged = bench(lambda: w.run(q, cache))
    t_dense = bench(lambda: pagoda.flash_attn_varlen_func(q, k, v, cu, cu, s, s, causal=True))
    return {"batch": batch, "seqlen": s, "paged_tflops": flops / t_paged / 1e9, "dense_tflops": flops / t_dense / 1e9,
            "ratio": t_dense / t_paged,
            "rel_err": ((out.float() - dense.float()).norm() / dense.float().norm()).item()}


def main():
    quick = "--quick" in sys.argv
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, torch.version.cuda)
    dec = [decode_row(b, c) for b, c in (DEC[:3] if quick else DEC)]
    print("\n| batch | ctx | pagoda p16 TB/s | pagoda p1 TB/s | p1/p16 | cuDNN TB/s | FlashInfer TB/s (tc off/on) | err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in dec:
        fi = (f"{r['flashinfer_tc0']:.2f} / {r['flashinfer_tc1']:.2f}" if "flashinfer_tc0" in r
              else r.get("flashinfer", ""))
        print(f"| {r['batch']} | {r['ctx']} | {r['pagoda_p16']:.2f} | {r['pagoda_p1']:.2f} | "
              f"{r['pagoda_p1'] / r['pagoda_p16']:.2f} | {r['cudnn']:.2f} | {fi} | {r['rel_err']:.1e} |")
    pre = [prefill_row(b, s) for b, s in (PRE[:1] if quick else PRE)]
    print("\n| batch | seqlen | paged TFLOP/s | dense TFLOP/s | paged/dense | err |\n|---|---|---|---|---|---|")
    for r in pre:
        print(f"| {r['batch']} | {r['seqlen']} | {r['paged_tflops']:.0f} | {r['dense_tflops']:.0f} | "
              f"{r['ratio']:.2f} | {r['rel_err']:.1e} |")
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "decode": dec, "prefill": pre}, f, indent=1)


if __name__ == "__main__":
    main()

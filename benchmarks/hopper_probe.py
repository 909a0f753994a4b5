"""Probe of the Gluon sm_90 attention kernel against cuDNN SDPA and pagoda's Triton kernel (GPU only).

    PYTHONPATH=$PWD python3 benchmarks/hopper_probe.py [--quick] [--configs a,b] [--head-dims 64] [--tune] \
        > $OUT/hopper.txt

1. Smoke stage: each Gluon config (`attention_hopper.CONFIGS`, `WS_CONFIGS`) runs in its own subprocess
   (all at once) on small shapes (d 64/128, or only 64 for the 3-consumer ws3 configs: `config_head_dims`;
   causal or not, ragged lengths, GQA) against a float32 reference, and prints
   the compiled kernel's registers / spills / shared memory. A config that crashes (illegal address kills
   the CUDA context) or is wrong is dropped from the timing stage; the compiles land in triton's cache.
2. Timing stage, bf16, hidden 2048 (heads = 2048 / d): (d 64, 128) x (causal, not) x ((32, 512), (4, 4096),
   (1, 16384)). Per case: cuDNN SDPA on [b, h, s, d], pagoda's Triton kernel (default launch config;
   --tune autotunes, slower), every surviving Gluon config. Each output is checked against cuDNN's (max
   abs error) before `do_bench` (median, L2 flushed). Prints TFLOP/s (4 b s^2 h d, halved when causal)
   and the ratio to cuDNN. --quick: the default Gluon configs plus one persistent, one warp-specialised,
   one ping-pong, the 3-consumer (ws3, d=64) and the persistent warp-specialised (pws*) configs, s >= 4096
   only. --head-dims 64 times d=64 only; --shapes 32x512,16x1024 times those (batch x seqlen) instead. Each
   case also times SDPA's flash backend (FA2), issue 2's 1.5x reference. The LSE is written unless --no-lse
   (the grid's flash_attn_func calls do not ask for it, and the register-tight configs run faster without).
Guards: a smoke subprocess is killed after 100 s (hang); a watchdog ends the probe after 150 s without
progress; timings past --budget seconds (default 225) are skipped, so the run stays under ~4 minutes.
"""
import argparse
import os
import subprocess
import sys
import threading
import time

_STATE = {"last": time.time(), "what": "start"}


def _progress(what: str) -> None:
    _STATE["last"], _STATE["what"] = time.time(), what


def _watchdog(limit_s: float) -> None:
    """A kernel that never finishes (an mbarrier wait that never completes) would hang the probe: exit."""
    while True:
        time.sleep(2)
        if time.time() - _STATE["last"] > limit_s:
            print(f"WATCHDOG: no progress for {limit_s:.0f} s during {_STATE['what']}: exiting", flush=True)
            os._exit(3)

_SMOKE = r'''
import sys, torch
from pagoda.kernels.hopper import attention as H
from pagoda.reference.attention import flash_attn_func as ref
name = sys.argv[1]
torch.manual_seed(0)
for d in H.config_head_dims(name):
    for causal in (False, True):
        info = ""
        worst = 0.0
        for b, sq, sk, hq, hk in ((2, 17, 300, 4, 2), (1, 300, 17, 2, 2), (2, 1000, 1000, 24, 6), (1, 1, 129, 2, 1)):
            q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
            out = torch.full_like(q, float("nan"))
            lse = torch.full((b, hq, sq), float("nan"), device="cuda")
            k0 = H.attention_fwd_hopper(q, k, v, out, lse, d ** -0.5, causal, config=name)
            torch.cuda.synchronize()
            if not info and k0 is not None:
                info = f"regs={k0.n_regs} spills={k0.n_spills} smem={k0.metadata.shared}"
            r, rl, _ = ref(q, k, v, causal=causal, return_attn_probs=True)
            err = ((out.float() - r.float()).norm() / r.float().norm()).item()
            fin = torch.isfinite(rl)
            lerr = (lse[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0
            bad_inf = not torch.equal(torch.isneginf(lse), torch.isneginf(rl))
            if out.isnan().any() or lse.isnan().any() or bad_inf:
                err = float("inf")
            worst = max(worst, err, lerr)
            print(f"  smoke {name} d={d} causal={causal:d} b={b} sq={sq} sk={sk} hq={hq} hk={hk}: rel_err={err:.1e} "
                  f"lse_err={lerr:.1e}", flush=True)
        print(f"SMOKE {name} d={d} causal={causal:d} {info} worst={worst:.1e} {'OK' if worst < 2e-2 else 'WRONG'}",
              flush=True)
'''


def smoke(names, root):
    """One subprocess per config, all at once (compiles run in parallel; a crash stays in its process)."""
    good = {}
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    procs = {name: subprocess.Popen([sys.executable, "-c", _SMOKE, name], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=root) for name in names}
    for name, proc in procs.items():
        _progress(f"smoke {name}")
        try:
            out, err = proc.communicate(timeout=max(10.0, 100 - (time.time() - t0)))
            rc, tail = proc.returncode, err.strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            proc.kill()  # a hung kernel (e.g. an mbarrier never completing): drop the config
            out, _ = proc.communicate()
            rc, tail = -1, ["timeout (hang?)"]
        print(out, end="", flush=True)
        ok = {(int(l.split("d=")[1].split()[0]), l.split("causal=")[1][0] == "1")
              for l in out.splitlines() if l.startswith("SMOKE") and l.rstrip().endswith("OK")}
        good[name] = ok
        print(f"smoke {name}: rc={rc} passed={sorted(ok)} ({time.time() - t0:.0f} s since start)"
              + ("" if rc == 0 else f"  stderr: {' | '.join(tail)}"), flush=True)
    return good


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", default="")
    ap.add_argument("--tune", action="store_true", help="autotune pagoda's Triton kernel (slow)")
    ap.add_argument("--no-smoke", action="store_true", help="time every config without the subprocess check")
    ap.add_argument("--budget", type=float, default=225.0, help="seconds; later timings are skipped past it")
    ap.add_argument("--head-dims", default="128,64", help="head dims of the timing stage, in this order")
    ap.add_argument("--no-lse", action="store_true", help="time without writing the LSE (as flash_attn_func "
                                                           "without return_attn_probs: the grid's case)")
    ap.add_argument("--shapes", default="", help="timing shapes as BxS,... (e.g. 32x512,16x1024; default: the "
                                                 "grid's 32x512, 4x4096, 1x16384, or --quick's two)")
    args = ap.parse_args()
    os.environ["PAGODA_HOPPER_ATTN"] = "0"
    os.environ.setdefault("PAGODA_AUTOTUNE", "1" if args.tune else "0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)

    import torch
    import triton
    import triton.testing
    from torch.nn import functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pagoda.kernels.hopper import attention as H
    from pagoda.kernels.attention.fwd import attention_fwd

    t_start = time.time()
    threading.Thread(target=_watchdog, args=(150.0,), daemon=True).start()
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} "
          f"cudnn={torch.backends.cudnn.version()}", flush=True)
    if args.configs:
        names = args.configs.split(",")
    elif args.quick:
        names = sorted(set(H.DEFAULT_CONFIG.values()) | {"m128n128s2w8", "ws-m128n128s3", "wspp-m128n128s3",
                                                          "ws3-m192n128s2", "ws3pp-m192n128s2",
                                                          "ws3pp-m192n128s3", "pws-m128n128s2",
                                                          "pwspp-m128n128s2"})
    else:
        names = list(H.CONFIGS) + list(H.WS_CONFIGS)
    if args.no_smoke:
        good = {n: {(d, c) for d in H.config_head_dims(n) for c in (False, True)} for n in names}
    else:
        good = smoke(names, root)
    print(f"smoke stage done at {time.time() - t_start:.0f} s", flush=True)
    _progress("timing stage")

    shapes = ((4, 4096), (1, 16384)) if args.quick else ((32, 512), (4, 4096), (1, 16384))
    if args.shapes:
        shapes = tuple(tuple(int(x) for x in bs.split("x")) for bs in args.shapes.split(","))
    summary = []
    for d in (int(x) for x in args.head_dims.split(",")):
        for causal in (False, True):
            for b, s in shapes:
                h = 2048 // d
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
                flops = 4 * b * s * s * h * d / (2 if causal else 1)
                tag = f"d={d:3d} causal={causal:d} b={b:2d} s={s:5d}"
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
                    ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                                 return_mode="median")
                c_tf = flops / ms / 1e9
                print(f"{tag} cudnn        {ms * 1e3:9.1f} us {c_tf:6.1f} TF/s", flush=True)
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):   # FA2: issue 2's 1.5x reference
                    ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                                 return_mode="median")
                f_tf = flops / ms / 1e9
                print(f"{tag} sdpa-flash   {ms * 1e3:9.1f} us {f_tf:6.1f} TF/s", flush=True)
                impls = [("pagoda-triton", None)] + [(f"gluon:{n}", n) for n in names if (d, causal) in good[n]]
                best = {}
                for label, name in impls:
                    if time.time() - t_start > args.budget:
                        print(f"{tag} {label:12s} skipped (past the --budget of {args.budget:.0f} s)", flush=True)
                        continue
                    _progress(f"{tag} {label}")
                    out = torch.empty_like(q)
                    lse = None if args.no_lse else torch.empty(b, h, s, device="cuda", dtype=torch.float32)
                    if name is None:
                        def run():
                            attention_fwd(q, k, v, out, lse, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=s,
                                          batch_size=b, softmax_scale=d ** -0.5, window_left=-1,
                                          window_right=0 if causal else -1, softcap=0.0, alibi_slopes=None)
                    else:
                        def run(name=name):
                            H.attention_fwd_hopper(q, k, v, out, lse, d ** -0.5, causal, config=name)
                    try:
                        out.fill_(float("nan"))
                        run()
                        torch.cuda.synchronize()
                        err = (out.float() - ref.float()).abs().max().item()
                        if err != err or err > 0.05:
                            print(f"{tag} {label:12s} WRONG max_abs_err={err:.3g} (not timed)", flush=True)
                            continue
                        ms = triton.testing.do_bench(run, return_mode="median")
                    except Exception as exc:  # keep sweeping; an illegal address would still end the run
                        msg = str(exc).strip().splitlines()
                        first = msg[0][:200] if msg else ""
                        print(f"{tag} {label:12s} FAILED {type(exc).__name__}: {first}", flush=True)
                        if "illegal" in str(exc).lower():
                            return
                        continue
                    tf = flops / ms / 1e9
                    best[label] = tf
                    print(f"{tag} {label:12s} {ms * 1e3:9.1f} us {tf:6.1f} TF/s {tf / c_tf:5.2f}x cudnn "
                          f"{tf / f_tf:5.2f}x flash max_abs_err={err:.1e}", flush=True)
                g = max(((tf, l) for l, tf in best.items() if l.startswith("gluon")), default=(0.0, "-"))
                summary.append((tag, c_tf, f_tf, best.get("pagoda-triton", 0.0), g))
    print(f"\nSUMMARY (TF/s; ratio to cuDNN, to SDPA flash) after {time.time() - t_start:.0f} s", flush=True)
    for tag, c_tf, f_tf, p_tf, (g_tf, g_name) in summary:
        print(f"{tag}  cudnn {c_tf:6.1f} | flash {f_tf:6.1f} | triton {p_tf:6.1f} ({p_tf / c_tf:4.2f}x) | best gluon "
              f"{g_tf:6.1f} ({g_tf / c_tf:4.2f}x, {g_tf / f_tf:4.2f}x flash) {g_name}", flush=True)


if __name__ == "__main__":
    main()

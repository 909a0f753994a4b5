"""Host time of one HF attention call: pagoda's attention function vs transformers' own (sdpa, eager).

HF ``generate`` on models up to a few billion parameters is host-bound (Python per layer per token),
so what each attention function costs the host, not the GPU, decides tokens/s. On CUDA this times the
real calls (no synchronisation inside the loop; the kernels are tiny and never back the queue up).
On the CPU, where pagoda would run its reference path, the CUDA path is timed with the kernel launch
stubbed out (``is_cuda`` reported True, the launch a no-op): everything up to the launch. On CUDA a
cProfile of pagoda's call (top functions by own time) comes with it, to show where the time goes.

Cases (one decode step of a 0.6B-class layer: q ``[b, 16, 1, 128]``, k/v ``[b, 8, kv, 128]``):
``no mask`` (dynamic cache, no padding: HF passes no mask) and ``static mask`` (static cache: a
boolean ``[b, 1, 1, capacity]`` mask, the same tensor for every layer of a forward).
"""
from __future__ import annotations

import contextlib
import time
from unittest import mock

import torch


def _per_call_us(fn, n: int, sync, chunks: int = 5) -> float:
    """Fastest of ``chunks`` runs of ``n / chunks`` calls, per call: robust to a busy host."""
    for _ in range(max(n // 10, 3)):
        fn()
    sync()
    per = max(n // chunks, 1)
    best = float("inf")
    for _ in range(chunks):
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        best = min(best, time.perf_counter() - t0)
        sync()
    return best / per * 1e6


@contextlib.contextmanager
def _stubbed_launch():
    """CPU only: take pagoda's CUDA path with the Triton launch replaced by a no-op."""
    from pagoda.kernels.attention import decode as _decode_kernels
    from pagoda.ops import _attention_op
    with mock.patch.object(torch.Tensor, "is_cuda", property(lambda self: True)), \
            mock.patch.object(_attention_op, "_launch", lambda *a, **kw: None), \
            mock.patch.object(_decode_kernels, "decode_fwd", lambda *a, **kw: None), \
            mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False):
        yield


def measure(device: torch.device, dtype: torch.dtype = torch.bfloat16, batch: int = 64, kv_len: int = 160,
            capacity: int = 192, n: int = 300) -> dict:
    """µs of host time per attention call, per implementation and case (see the module docstring)."""
    from pagoda.integrations.transformers import pagoda_attention_forward

    hq, hk, d = 16, 8, 128
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, hq, 1, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, hk, capacity, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(batch, hk, capacity, d, device=device, dtype=dtype, generator=g)
    mask = torch.zeros(batch, 1, 1, capacity, dtype=torch.bool, device=device)
    mask[..., :kv_len] = True
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, hq // hk, False
    scale = d ** -0.5
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    k_dyn, v_dyn = k[:, :, :kv_len].contiguous(), v[:, :, :kv_len].contiguous()

    impls = {"pagoda": pagoda_attention_forward}
    if device.type == "cuda":
        try:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            impls["sdpa"] = sdpa_attention_forward
        except Exception:  # transformers without that module: pagoda only
            pass
    result = {"device": str(device), "stubbed_launch": device.type != "cuda", "batch": batch, "kv_len": kv_len,
              "capacity": capacity, "us_per_call": {}}
    stub = _stubbed_launch() if device.type != "cuda" else contextlib.nullcontext()
    with stub, torch.no_grad():
        for name, fn in impls.items():
            cases = {"no mask": lambda fn=fn: fn(module, q, k_dyn, v_dyn, None, scaling=scale),
                     "static mask": lambda fn=fn: fn(module, q, k, v, mask, scaling=scale)}
            for case, call in cases.items():
                try:
                    result["us_per_call"][f"{name}, {case}"] = round(_per_call_us(call, n, sync), 2)
                except Exception as exc:  # report, go on
                    result["us_per_call"][f"{name}, {case}"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        if device.type == "cuda":
            from pagoda.ops.attention import flash_attn_func
            qt, kt, vt = q.transpose(1, 2), k_dyn.transpose(1, 2), v_dyn.transpose(1, 2)
            try:
                result["us_per_call"]["pagoda flash_attn_func alone, no mask"] = round(_per_call_us(
                    lambda: flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=True), n, sync), 2)
                result["pagoda_profile"] = _profile(
                    lambda: pagoda_attention_forward(module, q, k_dyn, v_dyn, None, scaling=scale), n)
            except Exception as exc:
                result["pagoda_profile"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return result


def _profile(fn, n: int, top: int = 14) -> list[str]:
    """cProfile of ``n`` calls: the ``top`` functions by own time, as 'µs per call  calls per call  name'."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats            # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [f"{tt / n * 1e6:7.2f} us {nc / n:5.1f}x  {fn_[2]} ({fn_[0].rsplit('/', 1)[-1]}:{fn_[1]})"
            for fn_, (cc, nc, tt, ct, callers) in rows]

"""The layers study: pagoda's fused layer ops (RMSNorm with and without the residual add, gated activations)
at the engine's shapes, beside the same function in PyTorch eager, under ``torch.compile`` and in FlashInfer,
as time per call and as a fraction of the device-to-device copy bandwidth measured in the same run.

GPU grid: hidden 1024 / 4096 / 8192 for the norms (Qwen3-0.6B, Llama-3-8B, 70B-class), intermediate 3072 /
14336 for the activations, tokens 1 / 256 / 8192 / 16384 (a decode step of one and of 256 requests, the engine's
8,192-token prefill chunk, a long prompt). CPU grid: a tiny embedded one (seconds).

Bytes that must move (each element read or written once): ``rmsnorm`` reads the rows and writes them (``2 N H``
elements, plus the weight); ``fused_add_rmsnorm`` reads input and residual and writes both (``4 N H``);
``*_and_mul`` reads ``2 N d`` and writes ``N d``. Figures per call:

    us         median device time of one call replayed from a CUDA graph (`timing.graph_time_ms`, L2 flushed
               between replays), as the engine runs a decode step's layers: at a few microseconds a call, timing
               the launch from Python would measure the launcher, not the kernel; a backend that cannot be
               captured is timed with CUDA events around the call (the row's ``timing``); on the CPU, a clock
    gbps       bytes that must move / us
    copy_frac  gbps / the copy bandwidth of a large device-to-device copy measured at the start of the run
               (``copy_gbps`` in meta): how close the op comes to the memory system's streaming rate
    x_copy     us / the time of a device-to-device copy of the same number of bytes, measured beside it (the
               size-matched floor: at one token every op, a copy included, is a few microseconds of latency)

The PyTorch functions are the models' own forms: HF's ``LlamaRMSNorm`` / ``GemmaRMSNorm`` (with ``residual +
input`` first for the fused forms, out of place) and ``act_fn(gate) * up`` in the dtype; ``torch_compile``
compiles each once per (op, width) with ``fullgraph=True`` (tokens become dynamic after the second size, as
torch.compile does; Dynamo's recompile limit raised, a row that ran uncompiled is an error, `pagoda.bench.compiled`).
"""
from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pagoda.bench import report as _report
from pagoda.bench.attention import _classify
from pagoda.bench.budget import case_limit, run_cases
from pagoda.bench.compiled import CompileWatch, silently_eager, users_compile
from pagoda.bench.timing import graph_time_ms, time_ms
from pagoda.reference import norm as _ref_norm

NORM_OPS = ("rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm")
ACT_OPS = ("silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul")
OPS = NORM_OPS + ACT_OPS
FULL_HIDDEN, FULL_INTER, FULL_TOKENS = (1024, 4096, 8192), (3072, 14336), (1, 256, 8192, 16384)
SMALL_HIDDEN, SMALL_INTER, SMALL_TOKENS = (64,), (48,), (1, 7)
EPS = 1e-6
COPY_BYTES = 1 << 30         # the peak-bandwidth copy: 1 GiB read + 1 GiB written on CUDA


@dataclass(slots=True, frozen=True)
class LayerCase:
    op: str
    tokens: int
    width: int               # hidden size (norms) or intermediate size d (activations: input 2d, output d)

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.tokens <= 0 or self.width <= 0:
            raise ValueError(f"LayerCase sizes must be positive, got {self}")

    def label(self) -> str:
        return f"{self.op} n={self.tokens} w={self.width}"


def layer_grid(name: str) -> list[LayerCase]:
    """``full``: the engine's shapes (GPU default); ``small``: the embedded CPU default."""
    if name == "full":
        hidden, inter, tokens = FULL_HIDDEN, FULL_INTER, FULL_TOKENS
    elif name == "small":
        hidden, inter, tokens = SMALL_HIDDEN, SMALL_INTER, SMALL_TOKENS
    else:
        raise ValueError(f"grid must be 'full' or 'small', got {name!r}")
    return ([LayerCase(op, n, h) for op in NORM_OPS for h in hidden for n in tokens]
            + [LayerCase(op, n, d) for op in ACT_OPS for d in inter for n in tokens])


def moved_bytes(case: LayerCase, itemsize: int) -> int:
    """Bytes every implementation must read and write at least once (module docstring)."""
    n, w = case.tokens, case.width
    if case.op in ACT_OPS:
        return 3 * n * w * itemsize
    rows = 4 if "fused" in case.op else 2
    return (rows * n * w + w) * itemsize


# ------------------------------------------------------------------------------------------- inputs

def _inputs(case: LayerCase, device, dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    n, w = case.tokens, case.width
    if case.op in ACT_OPS:
        return {"x": torch.randn(n, 2 * w, device=device, generator=g).to(dtype)}
    return {"x": torch.randn(n, w, device=device, generator=g).to(dtype),
            "r": torch.randn(n, w, device=device, generator=g).to(dtype),
            "w": (1 + 0.1 * torch.randn(w, device=device, generator=g)).to(dtype)}


# ------------------------------------------------------------------------------------------- backends

_ACT_FNS = {
    "silu_and_mul": F.silu,
    "gelu_and_mul": F.gelu,
    "gelu_tanh_and_mul": lambda g: F.gelu(g, approximate="tanh"),
}


def torch_function(op: str):
    """The models' PyTorch form of ``op`` (HF's modules), taking the `_inputs` tensors as keywords. The fused
    norms are out of place (``residual + input`` then the norm); they move the same bytes as the in-place op."""
    if op in ACT_OPS:
        act = _ACT_FNS[op]

        def act_and_mul(x):
            d = x.shape[-1] // 2
            return act(x[..., :d]) * x[..., d:]
        return act_and_mul
    gemma = op.startswith("gemma")
    if "fused" in op:
        def fused(x, r, w):
            s = r + x
            return _ref_norm.rmsnorm_ref(s, w, EPS, gemma), s
        return fused

    def plain(x, r, w):
        return _ref_norm.rmsnorm_ref(x, w, EPS, gemma)
    return plain


def _prep_pagoda(op, t):
    from pagoda.ops import activation, norm

    if op in ACT_OPS:
        fn, x = getattr(activation, op), t["x"]
        out = torch.empty(x.shape[0], x.shape[1] // 2, device=x.device, dtype=x.dtype)
        return lambda: fn(x, out=out)
    if "fused" in op:
        # In place: each call adds the input into the residual again (values drift, bytes and work do not).
        fn = getattr(norm, op)
        x, r, w = t["x"].clone(), t["r"].clone(), t["w"]
        return lambda: fn(x, r, w, EPS)
    fn, x, w = getattr(norm, op), t["x"], t["w"]
    out = torch.empty_like(x)
    return lambda: fn(x, w, EPS, out=out)


def _prep_torch(op, t):
    fn = torch_function(op)
    return lambda: fn(**t) if op not in ACT_OPS else fn(t["x"])


_compiled: dict[tuple, object] = {}     # (op, width, device) -> torch.compile'd function


def _own_code(fn, name: str):
    """``fn`` with a code object of its own: Dynamo keeps its compiled graphs and its automatic-dynamic record
    per code object, and the closures of `torch_function` share one per form, so without this a second width
    would compile the hidden size as dynamic (a looped reduction), not as the static size a model has."""
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") \
        else fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _prep_compile(op, t):
    x = t["x"]
    key = (op, x.shape[-1], x.device)
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = torch.compile(_own_code(torch_function(op), f"{op}_w{x.shape[-1]}"), fullgraph=True)
    return lambda: fn(**t) if op not in ACT_OPS else fn(x)


def _prep_flashinfer(op, t):
    mod = importlib.import_module("flashinfer.activation" if op in ACT_OPS else "flashinfer.norm")
    fn = getattr(mod, op)
    if op in ACT_OPS:
        x = t["x"]
        out = torch.empty(x.shape[0], x.shape[1] // 2, device=x.device, dtype=x.dtype)
        return lambda: fn(x, out=out)
    if "fused" in op:
        x, r, w = t["x"].clone(), t["r"].clone(), t["w"]
        return lambda: fn(x, r, w, EPS)
    x, w = t["x"], t["w"]
    out = torch.empty_like(x)
    return lambda: fn(x, w, EPS, out=out)


def _flashinfer_unavailable(device):
    if device.type != "cuda":
        return "needs a CUDA device"
    try:
        importlib.import_module("flashinfer.norm")
        importlib.import_module("flashinfer.activation")
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"flashinfer not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return None


BACKENDS = {
    "pagoda": ("pagoda.ops.norm / pagoda.ops.activation (Triton on CUDA, reference elsewhere)",
               lambda d: None, _prep_pagoda),
    "torch": ("PyTorch eager: HF's RMSNorm modules, act_fn(gate) * up", lambda d: None, _prep_torch),
    "torch_compile": ("torch.compile of the same PyTorch functions (one per op and width)",
                      lambda d: None, _prep_compile),
    "flashinfer": ("flashinfer.norm / flashinfer.activation", _flashinfer_unavailable, _prep_flashinfer),
}


# ---------------------------------------------------------------------------------------------- study

def _timing(device):
    return {"warmup_ms": 10, "rep_ms": 40} if device.type == "cuda" else {"warmup_ms": 1, "rep_ms": 5}


_sig = _report.significant


def time_us(fn, device: torch.device) -> tuple[float, str]:
    """``(median µs of one fn() call, how it was timed)``: replayed from a CUDA graph on CUDA ("graph"),
    CUDA events around the call where capture fails ("events"), a clock on the CPU ("clock")."""
    if device.type == "cuda":
        try:
            return graph_time_ms(fn, device, **_timing(device)) * 1e3, "graph"
        except Exception:        # not capturable (a host sync inside): timed as called
            torch.cuda.synchronize(device)
            return time_ms(fn, device, **_timing(device)) * 1e3, "events"
    return time_ms(fn, device, **_timing(device)) * 1e3, "clock"


def copy_us(nbytes: int, device: torch.device) -> float:
    """Median time of a device-to-device copy that moves ``nbytes`` (half read, half written), in µs, timed
    as the ops are (`time_us`)."""
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    return time_us(lambda: dst.copy_(src), device)[0]


def copy_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Bandwidth of a large device-to-device copy (bytes read + written per second, GB/s): the streaming
    rate the layer ops are measured against. 1 GiB each way on CUDA, 64 MiB on the CPU."""
    nbytes = nbytes or (2 * COPY_BYTES if device.type == "cuda" else 1 << 27)
    return nbytes / (copy_us(nbytes, device) * 1e-6) / 1e9


def read_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Bandwidth of a large read-only stream (a float32 sum over ``nbytes``, GB/s): what a kernel that only
    reads (weights, KV) can reach, which on some GPUs is well above `copy_gbps`. 1 GiB on CUDA, 64 MiB on the
    CPU."""
    nbytes = nbytes or (COPY_BYTES if device.type == "cuda" else 1 << 26)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    return nbytes / (time_us(lambda: torch.sum(x, 0, out=out), device)[0] * 1e-6) / 1e9


def run_case(case: LayerCase, names: list[str], device: torch.device, dtype: torch.dtype,
             unavailable: dict[str, str | None], peak_gbps: float) -> list[dict]:
    """Time every backend on one case (the same inputs for all) and a same-size copy beside them."""
    t = _inputs(case, device, dtype)
    nbytes = moved_bytes(case, t["x"].element_size())
    floor = copy_us(nbytes, device)
    rows = []
    for name in names:
        row = {**asdict(case), "backend": name, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes,
               "status": "ok", "reason": None, "us": None, "gbps": None, "copy_frac": None, "x_copy": None,
               "copy_us": _sig(floor), "series": f"{name} w={case.width}"}
        rows.append(row)
        if unavailable.get(name):
            row.update(status="unavailable", reason=unavailable[name])
            continue
        watch = CompileWatch() if name == "torch_compile" else None
        try:
            fn = BACKENDS[name][2](case.op, t)
            fn()  # compile / warm up outside timing
            us, row["timing"] = time_us(fn, device)
        except Exception as exc:  # one backend failing must not stop the study
            row.update(zip(("status", "reason"), _classify(exc), strict=True))
            continue
        if watch is not None:
            delta = watch.delta()
            row["compiled_graphs"] = delta["graphs"]
            why = silently_eager(delta)
            if why:      # never an eager figure under the compiled backend's name
                row.update(status="error", reason=why)
                continue
        gbps = nbytes / (us * 1e-6) / 1e9
        row.update(us=_sig(us), gbps=_sig(gbps), copy_frac=_sig(gbps / peak_gbps, 3), x_copy=_sig(us / floor, 3))
    return rows


def run_study(grid: str, backends: list[str] | None, device: torch.device, dtype: torch.dtype = torch.bfloat16,
              budget_s: float | None = None) -> dict:
    """Run the layers study; returns the report (``study``, ``meta``, ``backends``, ``results``).

    ``budget_s``: no case starts once this many seconds have passed (the first case always runs); the cases
    not run are listed in the report, so a run bounded in time still leaves data."""
    limit = case_limit(budget_s)
    names = backends or list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; known: {sorted(BACKENDS)}")
    unavailable = {n: BACKENDS[n][1](device) for n in names}
    cases = layer_grid(grid)
    peak = copy_gbps(device)
    # Every (op, width) shares its function's code object with the other widths (and the gemma / act variants):
    # past Dynamo's recompile limit it would run them uncompiled. Raised here, and a fallback raises.
    compiling = users_compile() if "torch_compile" in names else contextlib.nullcontext({})
    with compiling as dynamo:
        results, skipped = run_cases(cases, "layers", limit,
                                     lambda c: run_case(c, names, device, dtype, unavailable, peak))
    _compiled.clear()
    return {
        "study": "layers",
        "meta": {**_report.environment(device), "grid": grid, "dtype": str(dtype).replace("torch.", ""),
                 "eps": EPS, "copy_gbps": _sig(peak), "dynamo": dynamo,
                 "copy": f"device-to-device copy of {2 * COPY_BYTES if device.type == 'cuda' else 1 << 27} bytes "
                         "(half read, half written), do_bench median",
                 "bytes": "rmsnorm 2NH+H, fused_add_rmsnorm 4NH+H, *_and_mul 3Nd elements",
                 "timing": "CUDA: median device time of one call replayed from a CUDA graph (do_bench, L2 flushed "
                          "between replays; a row's timing says 'events' where capture failed); CPU: a clock's "
                          "median",
                 "skipped_cases": skipped,
                 "skipped_why": f"started past --budget-s {limit:g}" if skipped else None},
        "backends": {n: {"available": unavailable[n] is None, "reason": unavailable[n], "describe": BACKENDS[n][0]}
                     for n in names},
        "results": results,
    }


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] == "ok":
        return f"{row['us']:.1f}" if row["us"] >= 10 else f"{row['us']:.3g}"
    return {"unavailable": "n/a", "unsupported": "skip", "oom": "OOM"}.get(row["status"], "err")


def _ratio(num: dict | None, den: dict | None) -> str:
    ok = num and den and num.get("status") == "ok" and den.get("status") == "ok"
    return f"{num['us'] / den['us']:.2f}x" if ok else "-"


def tables(report: dict, markdown: bool = False) -> str:
    """One table per op: µs per call of every backend, the same-size copy, pagoda's speed-up over each peer
    (peer time / pagoda time), pagoda's GB/s, its fraction of the copy bandwidth and its time over the copy's."""
    names = [n for n, b in report["backends"].items() if b["available"]]
    by_op: dict[str, dict[tuple, dict[str, dict]]] = {}
    for r in report["results"]:
        by_op.setdefault(r["op"], {}).setdefault((r["width"], r["tokens"]), {})[r["backend"]] = r
    peers = [p for p in ("torch", "torch_compile", "flashinfer") if p in names] if "pagoda" in names else []
    out = [f"Copy bandwidth (device-to-device, this run): {report['meta']['copy_gbps']} GB/s"]
    for op in [o for o in OPS if o in by_op]:
        headers = (["width", "tokens"] + [f"{n} us" for n in names] + ["copy us"] + [f"vs {p}" for p in peers]
                   + (["pagoda GB/s", "of copy BW", "x copy"] if "pagoda" in names else []))
        rows = []
        for key in sorted(by_op[op]):
            cells = by_op[op][key]
            any_row = next(iter(cells.values()))
            row = [key[0], key[1]] + [_cell(cells.get(n)) for n in names] + [any_row["copy_us"]]
            pg = cells.get("pagoda")
            row += [_ratio(cells.get(p), pg) for p in peers]
            if "pagoda" in names:
                ok = pg is not None and pg["status"] == "ok"
                row += [pg["gbps"], f"{pg['copy_frac']:.0%}", f"{pg['x_copy']:.2f}"] if ok else ["-", "-", "-"]
            rows.append(row)
        title = f"{op}, us per call ({report['meta']['dtype']})"
        if markdown:
            out.append(f"### {title}\n\n" + _report.markdown_table(headers, rows))
        else:
            out.append(title + "\n" + _report.format_table(headers, rows, align_left=0))
    out += _report.backend_notes(report, markdown)
    skips = sorted({f"{r['backend']} {r['op']}: {r['reason']}" for r in report["results"]
                    if r["status"] in ("error", "unsupported", "oom")})
    if skips:
        out.append("Skipped or failed:\n" + "\n".join(("- " if markdown else "  ") + e for e in skips))
    return "\n\n".join(out)

"""The end-to-end study: HF ``generate`` tokens/s per attention implementation.

Axes: attn_implementation (eager, sdpa, sdpa forced to each backend, flash_attention_2 and
flex_attention where they run, pagoda), batch size, dynamic vs static KV cache, and with/without a
per-token logits processor (repetition penalty), on a random-weight model of a named shape or a
local model folder. Nothing is downloaded: presets are configs, weights are random.
pagoda's own engine gets a row too; it reports "unavailable" until the engine exists.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from pagoda.bench import report as _report
from pagoda.bench.progress import Progress

# Shapes of real models (config values only; weights are random).
PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rope_theta=500000.0, max_position_embeddings=8192),
    "qwen3-0.6b": dict(arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(arch="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048),
    "tiny": dict(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}

IMPLEMENTATIONS = ["eager", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attention_2",
                   "flex_attention", "pagoda", "pagoda_engine"]
_SDPA_FORCED = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                "sdpa_efficient": "EFFICIENT_ATTENTION"}


@dataclass(slots=True)
class E2EConfig:
    model: str = "tiny"                 # a PRESETS key or a local HF model folder
    batch_sizes: tuple = (1, 4)
    prompt_len: int = 16
    new_tokens: int = 8
    caches: tuple = ("dynamic", "static")
    processors: tuple = ("none", "repetition_penalty")
    max_batch_search: bool = False

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {self.batch_sizes}")
        if self.prompt_len < 1 or self.new_tokens < 1:
            raise ValueError("prompt_len and new_tokens must be >= 1")
        bad = set(self.caches) - {"dynamic", "static"} or set(self.processors) - {"none", "repetition_penalty"}
        if bad:
            raise ValueError(f"unknown cache/processor setting(s): {sorted(bad)}")


def default_config(device: torch.device, grid: str) -> E2EConfig:
    if grid == "full" and device.type == "cuda":
        return E2EConfig(model="qwen3-0.6b", batch_sizes=(1, 16, 64, 128), prompt_len=512, new_tokens=128,
                         max_batch_search=True)
    return E2EConfig()


def unavailable_reason(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run here (None if it can)."""
    if impl == "pagoda_engine":
        return "pagoda's inference engine is not built yet (reserved row of the study)"
    if impl in _SDPA_FORCED or impl in ("flash_attention_2", "flex_attention"):
        if device.type != "cuda":
            return "needs a CUDA device"
    if impl == "sdpa_cudnn":
        from torch.nn.attention import SDPBackend
        if not hasattr(SDPBackend, "CUDNN_ATTENTION"):
            return "this torch has no cuDNN SDPA backend"
    if impl == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except Exception as exc:
            return f"flash_attn not importable ({type(exc).__name__})"
    return None


def build_model(name_or_path: str, device: torch.device, dtype: torch.dtype):
    """A random-weight model of a preset shape, or a local folder (config + safetensors)."""
    import transformers

    if name_or_path in PRESETS:
        spec = dict(PRESETS[name_or_path])
        arch = spec.pop("arch")
        cfg_cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[arch]
        cfg = cfg_cls(**spec, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device)
    return model.eval()


def _set_impl(model, impl: str) -> None:
    if impl == "pagoda":
        from pagoda.integrations.transformers import register
        register()
    hf_name = "sdpa" if impl in _SDPA_FORCED else impl
    model.set_attn_implementation(hf_name)


def _generate_fn(model, impl: str, batch: int, cfg: E2EConfig, cache: str, processor: str, device):
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, cfg.prompt_len), device=device)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    if processor == "repetition_penalty":
        kw["repetition_penalty"] = 1.1

    def run():
        if impl in _SDPA_FORCED:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([getattr(SDPBackend, _SDPA_FORCED[impl])]):
                return model.generate(input_ids=ids, attention_mask=mask, **kw)
        return model.generate(input_ids=ids, attention_mask=mask, **kw)
    return run


def _timed(fn, device, repeats: int = 2) -> float:
    """Median wall time (ms) of ``fn`` after one warm-up call (compilation, autotuning)."""
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def max_batch(model, impl: str, cfg: E2EConfig, device, start: int = 16, limit: int = 4096) -> int | None:
    """Largest batch whose short generate runs without OOM: doubling, then bisection; OOM is recovered."""
    short = E2EConfig(model=cfg.model, batch_sizes=(1,), prompt_len=cfg.prompt_len, new_tokens=4)

    def fits(b):
        try:
            with torch.no_grad():
                _generate_fn(model, impl, b, short, "dynamic", "none", device)()
            return True
        except Exception as exc:
            if not _is_oom(exc):
                raise
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    if not fits(1):
        return 0
    lo, hi = 1, start
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > max(1, lo // 16):     # bisect to ~6% resolution
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def run_study(cfg: E2EConfig, impls: list[str] | None, device: torch.device, dtype: torch.dtype) -> dict:
    names = impls or list(IMPLEMENTATIONS)
    unknown = [n for n in names if n not in IMPLEMENTATIONS]
    if unknown:
        raise ValueError(f"unknown attn implementation(s) {unknown}; known: {IMPLEMENTATIONS}")
    unavailable = {n: unavailable_reason(n, device) for n in names}
    model = build_model(cfg.model, device, dtype)
    runnable = [n for n in names if not unavailable[n]]
    cases = [(i, c, p, b) for i in runnable for c in cfg.caches for p in cfg.processors for b in cfg.batch_sizes]
    results, maxes = [], {}
    with Progress(len(cases), "e2e") as bar:
        for impl, cache, proc, batch in cases:
            row = dict(model=cfg.model, impl=impl, cache=cache, processor=proc, batch=batch,
                       prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens, status="ok", reason=None,
                       ms=None, tokens_per_s=None, peak_mem_mb=None)
            try:
                _set_impl(model, impl)
                fn = _generate_fn(model, impl, batch, cfg, cache, proc, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                ms = _timed(fn, device)
                row.update(ms=round(ms, 3), tokens_per_s=round(batch * cfg.new_tokens / ms * 1e3, 3))
                if device.type == "cuda":
                    row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            except Exception as exc:  # one failing case must not stop the study
                row.update(status="oom" if _is_oom(exc) else "error",
                           reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(row)
            bar.step(f"{impl} {cache} {proc} b={batch}")
    if cfg.max_batch_search and device.type == "cuda":
        for impl in runnable:
            _set_impl(model, impl)
            maxes[impl] = max_batch(model, impl, cfg, device)
    return {
        "study": "e2e",
        "meta": {**_report.environment(device), "dtype": str(dtype).replace("torch.", ""), "model": cfg.model,
                 "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens,
                 "metric": "tokens/s = batch * new_tokens / generate() wall time (median of 2 after warm-up)"},
        "backends": {n: {"available": unavailable[n] is None, "reason": unavailable[n]} for n in names},
        "results": results,
        "max_batch": maxes if maxes else ("not searched (CPU or disabled)"),
    }


def tables(report: dict, markdown: bool = False) -> str:
    """Tokens/s per implementation (columns) and batch (rows), one table per cache x processor."""
    names = [n for n, b in report["backends"].items() if b["available"]]
    out = []
    rows_all = report["results"]
    for cache, proc in sorted({(r["cache"], r["processor"]) for r in rows_all}):
        headers = ["batch"] + names + ["pagoda / best other"]
        rows = []
        for batch in sorted({r["batch"] for r in rows_all}):
            cells = {r["impl"]: r for r in rows_all
                     if r["cache"] == cache and r["processor"] == proc and r["batch"] == batch}
            row = [batch]
            for n in names:
                c = cells.get(n)
                row.append("-" if c is None else (f"{c['tokens_per_s']:.1f}" if c["status"] == "ok" else c["status"]))
            others = [c["tokens_per_s"] for n, c in cells.items() if n != "pagoda" and c["status"] == "ok"]
            pg = cells.get("pagoda")
            row.append(f"{pg['tokens_per_s'] / max(others):.2f}x" if pg and pg["status"] == "ok" and others else "-")
            rows.append(row)
        title = f"{report['meta']['model']}: tokens/s, cache={cache}, logits processor={proc}"
        table = _report.markdown_table(headers, rows) if markdown else _report.format_table(headers, rows, 0)
        out.append((f"### {title}\n\n" if markdown else title + "\n") + table)
    mb = report.get("max_batch")
    if isinstance(mb, dict) and mb:
        out.append("Max batch before OOM: " + ", ".join(f"{k}={v}" for k, v in mb.items()))
    reasons = [f"{n}: {b['reason']}" for n, b in report["backends"].items() if not b["available"]]
    errors = sorted({f"{r['impl']}: {r['reason']}" for r in rows_all if r["status"] != "ok"})
    for title, items in (("Unavailable", reasons), ("Failures", errors)):
        if items:
            out.append(f"{title}:\n" + "\n".join(("- " if markdown else "  ") + i for i in items))
    return "\n\n".join(out)

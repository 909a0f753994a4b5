"""The end-to-end study: HF ``generate`` tokens/s per attention implementation.

Axes: attn_implementation (eager, sdpa, sdpa forced to each backend, flash_attention_2 and
flex_attention where they run, pagoda), batch size, dynamic vs static KV cache, and with/without a
per-token logits processor (repetition penalty), on a random-weight model of a named shape or a
local model folder. Nothing is downloaded: presets are configs, weights are random.

Runs under a wall-clock budget when one is set (the GPU preset fits one 10-minute call): cases are
ordered so the ones that back the claim (batch >= 64) come first, every case is bounded, a case that
does not fit is recorded as skipped with the reason, and the report is rewritten after every case
so that even a killed run leaves its data. Every failure of one case is recorded, never raised.

    python3 -m pagoda.bench.e2e --grid gpu --out DIR      # the GPU preset, with plots
    pagoda bench e2e [--model ... --batch-sizes ...]      # the same study through the bench CLI
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from pagoda import _switches
from pagoda.bench import e2e_sampling
from pagoda.bench import report as _report
from pagoda.bench.budget import CaseTimeout, Clock, free, is_oom, reason, time_limit, time_ms
from pagoda.bench.e2e_report import tables
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
                   "flex_attention", "pagoda"]
_SDPA_FORCED = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                "sdpa_efficient": "EFFICIENT_ATTENTION"}
# Run order: the claim's rows first; torch.compile-based implementations (long first compile) last.
_ORDER = ["pagoda", "sdpa", "eager", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attention_2",
          "flex_attention"]
# KV caches of the study: HF's DynamicCache; its StaticCache with generate's auto torch.compile off (eager
# decode step); and "compiled", the StaticCache as HF runs it by default on a GPU: the decode step compiled
# (Inductor, CUDA graphs), host overhead gone (one compile per implementation x batch, a minute or more each).
CACHES = ("dynamic", "static", "compiled")
_PROCESSORS = {"none", "repetition_penalty", *e2e_sampling.SAMPLERS}   # values of the processor axis
CLAIM_BATCH = 64        # the claim's rows: tokens/s at batch >= 64 vs the best other implementation
REFINE_WITHIN = 0.75    # re-timed rows: every implementation within this fraction of the cell's best


@dataclass(slots=True)
class E2EConfig:
    model: str = "tiny"                 # a PRESETS key or a local HF model folder
    batch_sizes: tuple = (1, 4)
    prompt_len: int = 16
    new_tokens: int = 8
    caches: tuple = ("dynamic", "static")
    processors: tuple = ("none", "repetition_penalty")
    max_batch_search: bool = False
    repeats: int = 2                    # timed generate calls per case (median), after one warm-up call
    budget_s: float | None = None       # wall-clock budget of the whole study, model build included
    case_limit_s: float | None = None   # upper bound of one case (interrupted past it: status "timeout")
    refine_to: int = 0                  # leftover budget: re-time the claim's rows up to this many samples
    max_batch_prompt: int = 1024        # max-batch search: prompt length of the probes (2 new tokens)
    max_batch_limit: int = 2048         # ... largest batch tried
    max_batch_impls: tuple = ("pagoda", "sdpa", "eager")
    max_batch_budget_s: float = 60.0    # ... time reserved for the whole search (all implementations)
    max_batch_resolution: int = 8       # ... bisect until the OOM edge is known to within 1/this
    host_overhead: bool = True          # time one attention call's host cost per implementation

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {self.batch_sizes}")
        if self.prompt_len < 1 or self.new_tokens < 1:
            raise ValueError("prompt_len and new_tokens must be >= 1")
        bad = set(self.caches) - set(CACHES) or set(self.processors) - _PROCESSORS
        if bad:
            raise ValueError(f"unknown cache/processor setting(s): {sorted(bad)}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


GRIDS: dict[str, dict] = {
    "small": {},
    "full": dict(model="qwen3-0.6b", batch_sizes=(1, 16, 64, 128), prompt_len=512, new_tokens=128,
                 max_batch_search=True),
    # One 10-minute GPU run (benchmarks/gpu.sh e2e). A generate of 32 new tokens takes ~1.1 s at a
    # conservative 30 ms per host-bound decode step (+ ~0.1 s prefill); 3 generates per (impl, cache, batch)
    # (warm-up, no processor, repetition penalty) x 7 CUDA implementations x 2 caches x 4 batches -> ~180 s,
    # the rest of the 430 s for start-up, first compiles (flex_attention's torch.compile), the max-batch
    # search (50 s) and re-timing the claim's rows. tests/bench checks this arithmetic.
    "gpu": dict(model="qwen3-0.6b", batch_sizes=(64, 128, 16, 1), prompt_len=128, new_tokens=32, repeats=1,
                max_batch_search=True, budget_s=430.0, case_limit_s=90.0, refine_to=5, max_batch_budget_s=50.0,
                max_batch_resolution=4),
    # generate(do_sample=True, top_k=50, top_p=0.9) with HF's sorting warpers against pagoda's, beside greedy
    # (python3 -m pagoda.bench.e2e --grid sampling --backends sdpa,pagoda). ~1.1 s per generate (32 new tokens
    # at ~33 ms per host-bound step); 10 per (impl, cache, batch) -> ~11 s x 2 impls x 2 caches x 3 batches
    # ~ 130 s, plus the model build, the agreement check and the sampling-step timing: ~3 minutes.
    "sampling": dict(model="qwen3-0.6b", batch_sizes=(128, 16, 1), prompt_len=128, new_tokens=32, repeats=3,
                     caches=("dynamic", "static"), processors=("none", *e2e_sampling.SAMPLERS), budget_s=280.0,
                     case_limit_s=60.0, host_overhead=False),
}


def default_config(device: torch.device, grid: str) -> E2EConfig:
    """``small`` (CPU default, seconds), ``full`` (the study at its intended size, CUDA) or ``gpu``
    (the same axes sized for one 10-minute call)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; known: {sorted(GRIDS)}")
    if device.type != "cuda" and grid != "small":
        return E2EConfig()
    return E2EConfig(**GRIDS[grid])


def unavailable_reason(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run here (None if it can)."""
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


def build_model(name_or_path: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight model of a preset shape (weights drawn from ``seed``: the same model in every run, so
    the agreement check's near-ties are reproducible; the caller's RNG state is left as it was), or a local
    folder (config + safetensors)."""
    import transformers

    if name_or_path in PRESETS:
        spec = dict(PRESETS[name_or_path])
        arch = spec.pop("arch")
        cfg_cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[arch]
        cfg = cfg_cls(**spec, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(device):
            torch.manual_seed(seed)
            try:
                model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            except TypeError:  # transformers < 4.56 names it torch_dtype
                model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    else:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except TypeError:
            model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=dtype)
        model = model.to(device)
    # Exactly new_tokens per sequence: random weights emit EOS at random, and min_new_tokens would add a
    # logits processor to the "no processor" rows.
    model.generation_config.eos_token_id = None
    return model.eval()


def _set_impl(model, impl: str) -> None:
    if impl == "pagoda":
        from pagoda.integrations.transformers import register
        register()
    hf_name = "sdpa" if impl in _SDPA_FORCED else impl
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(hf_name)
    else:  # transformers < 4.55: the config field is what the layers read
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = hf_name


def _can_disable_compile() -> bool:
    try:
        import transformers
        return hasattr(transformers.GenerationConfig(), "disable_compile")
    except Exception:
        return False


def cache_kwargs(cache: str) -> dict:
    """generate() arguments of one of `CACHES`."""
    if cache == "dynamic":
        return {}
    kw = {"cache_implementation": "static"}
    if cache == "static" and _can_disable_compile():
        # generate() would torch.compile the decode step (CUDA graphs) for a static cache: minutes of compiling
        # per implementation x batch. The "compiled" cache is that; "static" is the eager decode step.
        kw["disable_compile"] = True
    return kw


def _generate_fn(model, impl: str, batch: int, prompt_len: int, new_tokens: int, cache: str, processor: str,
                 device):
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    if processor == "repetition_penalty":
        kw["repetition_penalty"] = 1.1
    kw.update(e2e_sampling.generate_kwargs(processor))

    def run():
        with torch.no_grad(), e2e_sampling.context(processor):
            if impl in _SDPA_FORCED:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel([getattr(SDPBackend, _SDPA_FORCED[impl])]):
                    return model.generate(input_ids=ids, attention_mask=mask, **kw)
            return model.generate(input_ids=ids, attention_mask=mask, **kw)
    return run


def _case_order(cfg: E2EConfig, runnable: list[str]):
    """(impl, cache, batch) groups: batches in the config's order (the GPU preset puts 64 and 128 first),
    torch.compile-based implementations after all others."""
    late = [i for i in runnable if i in ("flex_attention",)]
    early = [i for i in runnable if i not in late]
    return [(i, c, b) for impls in (early, late) for b in cfg.batch_sizes for c in cfg.caches for i in impls]


def run_study(cfg: E2EConfig, impls: list[str] | None, device: torch.device, dtype: torch.dtype,
              out: str | None = None, command: str | None = None) -> dict:
    """Run the study; with ``out``, the report files are rewritten there after every case (``command``:
    the command line recorded in the report, when not the bench CLI's). On the CPU with one intra-op
    thread: the CPU grid's models are tiny, and spinning OpenMP threads on a shared host cost 10x."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    import torch._dynamo.config as dynamo_config

    # The compiled cache compiles HF's decode step once per implementation x batch (and for the agreement
    # check), all of one code object: past Dynamo's recompile limit (8) the later rows would silently run
    # uncompiled.
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    limit = getattr(dynamo_config, name)
    if "compiled" in cfg.caches:
        setattr(dynamo_config, name, max(limit, 64))
    try:
        return _run_study(cfg, impls, device, dtype, out, command)
    finally:
        torch.set_num_threads(threads)
        setattr(dynamo_config, name, limit)


def _run_study(cfg, impls, device, dtype, out, command) -> dict:
    from pagoda.bench import e2e_checks
    clock = Clock(cfg.budget_s)
    names = impls or list(IMPLEMENTATIONS)
    unknown = [n for n in names if n not in IMPLEMENTATIONS]
    if unknown:
        raise ValueError(f"unknown attn implementation(s) {unknown}; known: {IMPLEMENTATIONS}")
    names = sorted(names, key=_ORDER.index)
    unavailable = {n: unavailable_reason(n, device) for n in names}
    try:
        import transformers
        tf_version = transformers.__version__
    except Exception:
        tf_version = None
    search = cfg.max_batch_search and device.type == "cuda"
    env = _report.environment(device)
    if command:
        env["command"] = command
    report = {
        "study": "e2e",
        "meta": {**env, "dtype": str(dtype).replace("torch.", ""), "model": cfg.model,
                 "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens, "transformers": tf_version,
                 "metric": f"tokens/s = batch * new_tokens / generate() wall time (prefill included), median of "
                           f"{cfg.repeats} after one warm-up generate of the same shapes"
                           + (f" (rows of batch >= {CLAIM_BATCH} near the cell's best: up to {cfg.refine_to}, the "
                              f"rest re-timed round-robin after an untimed warm-up round)"
                              if cfg.refine_to > cfg.repeats else "")
                           + "; gc collected and frozen around each timed generate",
                 "static_cache": ("HF StaticCache, generate's auto torch.compile disabled (eager decode step)"
                                  if _can_disable_compile() else "HF StaticCache (generate may auto-compile)"),
                 "compiled_cache": "HF StaticCache with generate's auto torch.compile of the decode step (Inductor, "
                                   "reduce-overhead: CUDA graphs) on CUDA; eager elsewhere",
                 "pagoda_autotune": "1" if _switches.autotune() else "0", "budget_s": cfg.budget_s,
                 "case_limit_s": cfg.case_limit_s,
                 "batch_sizes": list(cfg.batch_sizes), "status": "running"},
        "backends": {n: {"available": unavailable[n] is None, "reason": unavailable[n]} for n in names},
        "results": [],
        "samples_ms": {},
        "max_batch": "searching" if search else "not searched (CPU or disabled)",
        "host_overhead": None,
        "agreement": None,
    }

    def checkpoint():
        report["meta"]["elapsed_s"] = round(clock.elapsed(), 1)
        if out:
            try:
                _report.write_outputs(out, "e2e", report, tables(report, markdown=True))
            except Exception as exc:  # a report that cannot be written must not stop the measurements
                print(f"e2e: could not write the partial report: {reason(exc)}", flush=True)

    if cfg.host_overhead:
        try:
            from pagoda.bench import hf_overhead
            with time_limit(clock.limit(60.0)):
                report["host_overhead"] = hf_overhead.measure(device, dtype if device.type == "cuda" else
                                                              torch.bfloat16)
        except Exception as exc:
            report["host_overhead"] = {"error": reason(exc)}
    t_build = time.perf_counter()
    model = build_model(cfg.model, device, dtype)
    report["meta"]["model_build_s"] = round(time.perf_counter() - t_build, 1)
    runnable = [n for n in names if not unavailable[n]]
    if {"pagoda", "sdpa"} <= set(runnable):
        try:
            with time_limit(clock.limit(90.0)):
                report["agreement"] = e2e_checks.agreement(model, device, cfg.caches)
        except Exception as exc:
            report["agreement"] = {"error": reason(exc)}
        checkpoint()
    if any(map(e2e_sampling.is_sampling, cfg.processors)) and runnable:
        # Also the warm-up of both warper chains at every batch (pagoda's kernels compile on their first call;
        # a group's warm-up generate runs its first processor only).
        try:
            with time_limit(clock.limit(60.0)):
                report["sampling_step"] = e2e_sampling.sampling_step(model, device, cfg.batch_sizes)
        except Exception as exc:
            report["sampling_step"] = {"error": reason(exc)}
        checkpoint()
    groups = _case_order(cfg, runnable)
    reserve = cfg.max_batch_budget_s if search else 0.0
    rows = report["results"]
    with Progress(len(groups) * len(cfg.processors), "e2e") as bar:
        for impl, cache, batch in groups:
            warm, failed = False, None
            for proc in cfg.processors:
                row = dict(model=cfg.model, impl=impl, cache=cache, processor=proc, batch=batch,
                           prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens, status="ok", reason=None,
                           ms=None, tokens_per_s=None, peak_mem_mb=None)
                limit = clock.limit(cfg.case_limit_s, reserve)
                if failed is not None:
                    row.update(status=failed["status"], reason=f"as with processor=none: {failed['reason']}")
                elif limit is not None and limit < 3.0:
                    row.update(status="skipped", reason=f"time budget of {cfg.budget_s:.0f} s exhausted")
                else:
                    try:
                        with time_limit(limit):
                            _set_impl(model, impl)
                            fn = _generate_fn(model, impl, batch, cfg.prompt_len, cfg.new_tokens, cache, proc,
                                              device)
                            if device.type == "cuda":
                                torch.cuda.reset_peak_memory_stats(device)
                            if not warm:
                                breaks = _graph_breaks()
                                fn()           # warm-up: compiles, autotuning, cuDNN plans of every shape
                                warm = True
                                if cache == "compiled":      # what the compiled step left to eager Python
                                    row["graph_breaks"] = _graph_breaks() - breaks
                            samples = [_timed(fn, device) for _ in range(cfg.repeats)]
                        ms = statistics.median(samples)
                        report["samples_ms"][_label(impl, cache, proc, batch)] = [round(s, 3) for s in samples]
                        row.update(ms=round(ms, 3), tokens_per_s=round(batch * cfg.new_tokens / ms * 1e3, 3))
                        if device.type == "cuda":
                            row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                    except Exception as exc:  # one failing case must not stop the study
                        status = "timeout" if isinstance(exc, CaseTimeout) else "oom" if is_oom(exc) else "error"
                        row.update(status=status, reason=reason(exc))
                        if status == "error" and proc == cfg.processors[0]:
                            failed = row        # the processor does not touch attention: same failure
                        free(device)
                rows.append(row)
                shown = f"{row['tokens_per_s']:.0f} tok/s" if row["status"] == "ok" else row["status"]
                bar.step(f"{impl} {cache} {proc} b={batch}: {shown}")
                checkpoint()
            # The allocator's cache is emptied between groups only: the processors of one group share the
            # group's warm-up. (A generate timed right after emptying it would cudaMalloc its whole working
            # set again inside the timing. Run-to-run noise of a host-bound generate remains: see
            # docs/host-overhead.md.)
            free(device)

    if search:
        found = {}
        report["max_batch"] = found
        sub = Clock(None if cfg.budget_s is None else min(cfg.max_batch_budget_s, clock.left()))
        todo = [i for i in cfg.max_batch_impls if i in runnable]
        for n, impl in enumerate(todo):
            share = Clock(None if sub.budget_s is None else sub.left() / (len(todo) - n))  # fair share of the rest
            try:
                _set_impl(model, impl)
                found[impl] = e2e_checks.max_batch(model, impl, cfg, device, share)
            except Exception as exc:
                found[impl] = {"max_batch": None, "complete": False, "note": reason(exc)}
            print(f"e2e: max batch {impl}: {found[impl]['max_batch']} ({found[impl]['note'] or 'complete'})",
                  flush=True)
            checkpoint()

    if cfg.refine_to > cfg.repeats:
        _refine(model, cfg, device, report, clock, checkpoint)
    report["meta"]["status"] = "complete"
    checkpoint()
    return report


def _graph_breaks() -> int:
    """Graph breaks Dynamo has counted in this process (a compiled row's warm-up adds its own)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _label(impl, cache, proc, batch) -> str:
    return f"{impl}/{cache}/{proc}/b{batch}"


def _timed(fn, device) -> float:
    """``time_ms`` of one generate after a full garbage collection, with every object alive at that point
    frozen out of later collections: generate's own garbage then costs the same whatever the process has
    accumulated before (torch.compile's graphs, earlier reports)."""
    gc.collect()
    gc.freeze()
    try:
        return time_ms(fn, device)
    finally:
        gc.unfreeze()    # what dies later is collected as usual (a frozen cycle would hold its tensors)


def _refine(model, cfg, device, report, clock, checkpoint) -> None:
    """Leftover budget: more samples for the rows that decide the claim (batch >= CLAIM_BATCH), up to
    ``refine_to`` each, taken round-robin so that drift affects every implementation alike.

    Which rows: pagoda and *every* other implementation whose first figure is within ``REFINE_WITHIN`` of
    the cell's best. Re-timing only the single best other row would favour it (the best of several noisy
    single samples is biased upwards and would keep its lucky sample while pagoda's are re-drawn)."""
    rows = [r for r in report["results"] if r["status"] == "ok" and r["batch"] >= CLAIM_BATCH]
    targets = []
    for key in sorted({(r["cache"], r["processor"], r["batch"]) for r in rows}, key=str):
        cell = [r for r in rows if (r["cache"], r["processor"], r["batch"]) == key]
        best = max(r["tokens_per_s"] for r in cell)
        targets += [r for r in cell if r["impl"] == "pagoda" or r["tokens_per_s"] >= REFINE_WITHIN * best]
    # Round 0 is an untimed warm-up of every target: the max-batch search (or the groups' clean-up) left the
    # allocator's cache empty, and a generate that has to cudaMalloc its working set is not the one to time.
    # The cache is not emptied between the rounds' generates (a few GB at the claim's batches).
    for rnd in range(cfg.refine_to - cfg.repeats + 1):
        for row in targets:
            limit = clock.limit(cfg.case_limit_s)
            if limit is not None and limit < 3.0:
                return
            label = _label(row["impl"], row["cache"], row["processor"], row["batch"])
            try:
                with time_limit(limit):
                    _set_impl(model, row["impl"])
                    fn = _generate_fn(model, row["impl"], row["batch"], cfg.prompt_len, cfg.new_tokens, row["cache"],
                                      row["processor"], device)
                    if rnd == 0:
                        fn()
                        continue
                    report["samples_ms"][label].append(round(_timed(fn, device), 3))
            except Exception as exc:  # keep what was measured
                print(f"e2e: re-timing {label} failed: {reason(exc)}", flush=True)
                free(device)
                continue
            ms = statistics.median(report["samples_ms"][label])
            row.update(ms=round(ms, 3), tokens_per_s=round(row["batch"] * cfg.new_tokens / ms * 1e3, 3))
            checkpoint()


def main(argv=None) -> int:
    """``python3 -m pagoda.bench.e2e``: the study with the presets the bench CLI does not expose
    (`pagoda.bench.e2e_cli`)."""
    from pagoda.bench.e2e_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""``pagoda bench engine``: pagoda's engine (`pagoda.LLMEngine`) on nano-vLLM's throughput benchmark, beside
its bandwidth ceiling and HF transformers' ``generate`` on the same requests.

Workload (nano-vLLM's ``bench.py``): 256 requests submitted at once, each a prompt of ``randint(100, 1024)``
token ids drawn from ``randint(0, 10000)`` and ``max_tokens = randint(100, 1024)``, ``temperature=0.6``,
``ignore_eos=True`` (Python's ``random`` seeded with 0, prompts first), ``max_model_len=4096``. Default
model: Qwen3-0.6B's shapes with dummy weights (config built here; the tokenizer is a word-level one over
the vocabulary, since prompts are token ids). ``--model DIR``: any supported local folder.

Figures: output tokens/s, total (prompt + output) tokens/s, time to first token and inter-token latency
(p50/p99, each token timed when the host reads it back), peak KV-cache usage, the host's share of a
decode step and its per-step spread (p50, p90, max: compilation shows as a few outliers, a slower host
as a higher median) and the Triton kernels built on first use inside the pass (`pagoda.bench.jit_log`: what the
warm-up missed), each for ``--runs`` timed passes on one engine; and the ceiling computed from the
same requests (`ceiling`): every decode step reads every weight once and the KV of every running request
once (all requests run together from the start: the fewest steps), at the device-to-device copy
bandwidth measured in the same run, plus the prefill FLOPs at the bf16 matmul rate measured in the same run.
Beside it, "ceiling (reads)": the same bytes at the read-only bandwidth measured in the same run (a float32
sum over 1 GiB). Decode only reads, and on some GPUs reads stream well above a copy's rate (an H200 measured
2.63 TB/s copying), so that is the tighter bound.

``--batch-1``: one request's decode on a Llama-3-8B-shaped dummy model, time per token beside its floor
(weight bytes and the request's KV at the copy bandwidth, and at the read bandwidth).

``--processors``: the same requests with a logits constraint, through HF generate's Python processor (static
and dynamic caches) and pagoda's built-in, batch-level and per-request processors, each beside its own run
without them (`pagoda.bench.engine_processors`).

``--profile``: a profile of decode steps with every request running (`pagoda.bench.engine_profile`).

``--cascade``: the decode step over a 4,096-token shared system prompt with cascade attention and without
(`pagoda.bench.engine_cascade`).
"""
from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pagoda.bench import report as _report
from pagoda.bench.jit_log import JitLog
from pagoda.bench.stats import percentile

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                  max_position_embeddings=40960, tie_word_embeddings=True, rms_norm_eps=1e-6)
LLAMA_3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                  max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5)
_sig = _report.significant


@dataclass
class EngineBenchConfig:
    model: str | None = None            # local folder; None: Qwen3-0.6B (Llama-3-8B with batch_1) dummy
    load_format: str = "auto"           # of ``model``: "auto" (its safetensors) or "dummy" (random weights)
    num_requests: int = 256
    min_len: int = 100                  # input and output lengths: randint(min_len, max_len)
    max_len: int = 1024
    max_token_id: int = 10000
    seed: int = 0
    temperature: float = 0.6
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    hf: bool = True
    hf_impls: tuple = ("sdpa", "pagoda")
    hf_budget_s: float = 150.0          # per implementation: generate stops past it (partial figure)
    batch_1: bool = False
    batch_1_prompt: int = 512
    batch_1_tokens: int = 256
    dtype: str = "auto"
    runs: int = 2                       # timed passes of the workload on one engine, after the warm-up

    def __post_init__(self):
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")


def make_requests(cfg: EngineBenchConfig) -> list[tuple[list[int], int]]:
    """nano-vLLM's requests: ``(prompt_token_ids, max_tokens)``, prompts drawn first, then the lengths."""
    rng = random.Random(cfg.seed)
    prompts = [[rng.randint(0, cfg.max_token_id) for _ in range(rng.randint(cfg.min_len, cfg.max_len))]
               for _ in range(cfg.num_requests)]
    outs = [rng.randint(cfg.min_len, cfg.max_len) for _ in range(cfg.num_requests)]
    return list(zip(prompts, outs, strict=True))


def warmup_requests(cfg: EngineBenchConfig, n: int = 32) -> list[tuple[list[int], int]]:
    """Requests run before a timed run so that it compiles nothing: other prompts (no prefix-cache hits) of the
    workload's lengths, with output lengths staggered (2-9 tokens, the last one 16) so that the decode batch
    shrinks through sizes that are and are not multiples of 16 down to 1. Triton compiles a kernel again for an
    integer argument that becomes 1 or stops dividing by 16 (a batch size, a token count); a warm-up whose
    requests all end together leaves those variants to the timed run, ~1 s of compilation each."""
    warm_cfg = EngineBenchConfig(**{**asdict(cfg), "seed": cfg.seed + 1})
    prompts = [p for p, _ in make_requests(warm_cfg)[:min(n, cfg.num_requests)]]
    return [(p, 16 if j == len(prompts) - 1 else 2 + j % 8) for j, p in enumerate(prompts)]


def dummy_model_dir(spec: dict, arch: str, out: Path) -> Path:
    """A model folder with ``spec``'s config (no weights: load with ``load_format="dummy"``) and a word-level
    tokenizer that names every id of the vocabulary."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cls = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}[arch]
    arch_name = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    cls(**spec, architectures=[arch_name], bos_token_id=1, eos_token_id=2).save_pretrained(out)
    vocab = {f"t{i}": i for i in range(spec["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2")
    fast.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------ floors

def param_bytes(hf_config, itemsize: int) -> int:
    """Bytes of every weight (each read once per decode step; a tied LM head counted once)."""
    c = hf_config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    hq, hk, h, i = c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size
    qk_norm = 2 * d if getattr(c, "model_type", "") == "qwen3" else 0
    bias = (hq + 2 * hk) * d if getattr(c, "model_type", "") == "qwen2" else 0
    layer = h * (hq + 2 * hk) * d + hq * d * h + 3 * h * i + 2 * h + qk_norm + bias
    emb = c.vocab_size * h * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return (c.num_hidden_layers * layer + emb + h) * itemsize


def kv_bytes_per_token(hf_config, itemsize: int) -> int:
    c = hf_config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * d * itemsize


def prefill_flops(hf_config, prompt_lens: list[int]) -> float:
    """Matmul FLOPs of the prompts: 2 x (weights touched per token) per token, plus causal attention
    (QK^T and PV over n(n+1)/2 pairs per head); the LM head for the last token only."""
    c = hf_config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    hq, hk, h, i = c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size
    per_token = 2 * c.num_hidden_layers * (h * (hq + 2 * hk) * d + hq * d * h + 3 * h * i)
    attn = sum(2 * 2 * c.num_hidden_layers * hq * d * n * (n + 1) / 2 for n in prompt_lens)
    return float(sum(prompt_lens) * per_token + attn + 2 * len(prompt_lens) * h * c.vocab_size)


def ceiling(hf_config, itemsize: int, requests: list[tuple[list[int], int]], copy_gbps: float,
            matmul_tflops: float) -> dict:
    """The workload's floor time: ``max(out)`` decode steps, each reading every weight and the KV of the
    requests still running (request r at step t reads ``len(prompt) + t`` tokens), at ``copy_gbps``; plus
    the prefill FLOPs at ``matmul_tflops``. All requests run together (they fit the cache)."""
    kvt = kv_bytes_per_token(hf_config, itemsize)
    kv = sum(kvt * (out * len(p) + out * (out - 1) // 2) for p, out in requests)
    weights = param_bytes(hf_config, itemsize) * max(out for _, out in requests)
    flops = prefill_flops(hf_config, [len(p) for p, _ in requests])
    t = (kv + weights) / (copy_gbps * 1e9) + flops / (matmul_tflops * 1e12)
    outs = sum(out for _, out in requests)
    return dict(kv_tb=kv / 1e12, weight_tb=weights / 1e12, prefill_pflop=flops / 1e15, seconds=t,
                output_tok_s=outs / t, total_tok_s=(outs + sum(len(p) for p, _ in requests)) / t)


def measure_rates(device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> tuple[float, float, float]:
    """(device-to-device copy GB/s, read-only stream GB/s, matmul TFLOP/s of a ``[8192, hidden] x [hidden,
    inter]`` GEMM)."""
    from pagoda.bench.layers import copy_gbps, read_gbps
    from pagoda.bench.timing import time_ms

    gbps = copy_gbps(device)
    rgbps = read_gbps(device)
    m = 8192 if device.type == "cuda" else 64
    a = torch.randn(m, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, inter, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return gbps, rgbps, 2 * m * hidden * inter / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------------ engine

def _timed_run(engine, requests, drive, run: int) -> dict:
    """One timed pass of ``requests`` through ``engine`` (prefix cache emptied first): its row."""
    from pagoda.engine.llm_engine import StepStats

    device = engine.model_runner.device
    engine.block_manager.reset_prefix_cache()
    engine.stats = StepStats(decode_host_steps=[])
    engine.token_times = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with JitLog() as jit:
        peak = drive(engine, requests, f"r{run}-")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    ttft, itl = [], []
    for times in engine.token_times.values():
        ttft.append(times[0] - t0)
        itl += [b - a for a, b in zip(times, times[1:], strict=False)]
    outs = sum(n for _, n in requests)
    ins = sum(len(p) for p, _ in requests)
    st = engine.stats
    host = st.decode_host_steps
    return dict(system="pagoda", run=run, status="ok", requests=len(requests), elapsed_s=_sig(elapsed),
                output_tok_s=_sig(outs / elapsed), total_tok_s=_sig((outs + ins) / elapsed),
                ttft_p50_ms=_sig(1e3 * percentile(ttft, 50)), ttft_p99_ms=_sig(1e3 * percentile(ttft, 99)),
                itl_p50_ms=_sig(1e3 * percentile(itl, 50)) if itl else None,
                itl_p99_ms=_sig(1e3 * percentile(itl, 99)) if itl else None,
                peak_kv_usage=_sig(peak), steps=st.steps, decode_steps=st.decode_steps, graph_steps=st.graph_steps,
                prefill_step_ms=_sig(1e3 * (st.host_s + st.wait_s - st.decode_host_s - st.decode_wait_s)
                                     / max(st.steps - st.decode_steps, 1)),
                decode_step_ms=_sig(1e3 * (st.decode_host_s + st.decode_wait_s) / max(st.decode_steps, 1)),
                decode_host_ms=_sig(1e3 * st.decode_host_s / max(st.decode_steps, 1)),
                decode_host_p50_ms=_sig(1e3 * percentile(host, 50)) if host else None,
                decode_host_p90_ms=_sig(1e3 * percentile(host, 90)) if host else None,
                decode_host_max_ms=_sig(1e3 * max(host)) if host else None,
                decode_host_frac=_sig(st.decode_host_s / max(st.decode_host_s + st.decode_wait_s, 1e-12)),
                jit_builds=jit.count if jit.available else None, jit_s=_sig(jit.seconds) if jit.available else None,
                jit_kernels=jit.summary() or None)


def run_engine(model_dir: str, requests, cfg: EngineBenchConfig, load_format: str, warmup=None) -> tuple[list, dict]:
    """Run the requests through one `LLMEngine`, all submitted at once, ``cfg.runs`` times (after the
    warm-up); ``(a row per run, engine facts)``. A later run that is faster than the first shows what the
    first paid for work done once (kernel compilation the warm-up missed)."""
    from pagoda.engine import EngineConfig, LLMEngine, RequestOutputKind, SamplingParams

    engine = LLMEngine(EngineConfig(model=model_dir, load_format=load_format, dtype=cfg.dtype, seed=cfg.seed,
                                    max_model_len=cfg.max_model_len, gpu_memory_utilization=cfg.gpu_memory_utilization,
                                    enforce_eager=cfg.enforce_eager,
                                    max_num_seqs=max(1, min(256, len(requests))) if cfg.batch_1 else 256))
    device = engine.model_runner.device

    def params(n):
        return SamplingParams(temperature=cfg.temperature, ignore_eos=True, max_tokens=n,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    def drive(engine, reqs, tag):
        for j, (p, n) in enumerate(reqs):
            engine.add_request(f"{tag}{j}", {"prompt_token_ids": p}, params(n))
        peak = 0.0
        while engine.has_unfinished_requests():
            engine.step()
            peak = max(peak, engine.block_manager.usage)
        return peak

    if warmup:                 # compiles every kernel variant the run meets (`warmup_requests`)
        drive(engine, warmup, "w")
    rows = [_timed_run(engine, requests, drive, k + 1) for k in range(cfg.runs)]
    runner = engine.model_runner
    graphs = runner.graphs
    facts = dict(num_blocks=runner.num_blocks, block_size=runner.block_size,
                 kv_cache_gib=_sig(runner.kv_cache.numel() * runner.kv_cache.element_size() / 2**30),
                 graph_sizes=list(runner.graph_sizes), graph_capture_mib=_sig(graphs.memory_bytes / 2**20)
                 if graphs else None, graph_capture_s=_sig(graphs.capture_s) if graphs else None,
                 graph_reserve_mib=_sig(runner.graph_reserve_bytes() / 2**20),
                 dtype=str(runner.dtype), hf_config=engine.config.hf_config)
    if device.type == "cuda":
        facts["peak_memory_gib"] = _sig(torch.cuda.max_memory_allocated(device) / 2**30)
        facts["memory_total_gib"] = _sig(torch.cuda.mem_get_info(device)[1] / 2**30)
    del engine, runner, graphs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, facts


# ------------------------------------------------------------------------------------------------ study

def bench_model(cfg: EngineBenchConfig, tmp: str):
    """``(model_dir, load_format, hf_config, cfg)`` of a study: ``cfg.model``, else a dummy Qwen3-0.6B (Llama-3-8B
    with ``batch_1``) written under ``tmp``; ``cfg`` with prompt ids kept inside the model's vocabulary."""
    from transformers import AutoConfig

    if cfg.model:
        model_dir, load_format = cfg.model, cfg.load_format
    else:
        spec, arch = (LLAMA_3_8B, "llama") if cfg.batch_1 else (QWEN3_0_6B, "qwen3")
        model_dir, load_format = str(dummy_model_dir(spec, arch, Path(tmp))), "dummy"
    hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if cfg.max_token_id >= hf_config.vocab_size:        # a small model: ids inside its vocabulary
        cfg = EngineBenchConfig(**{**asdict(cfg), "max_token_id": hf_config.vocab_size - 1})
    return model_dir, load_format, hf_config, cfg


def run_study(cfg: EngineBenchConfig, device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, load_format, _, cfg = bench_model(cfg, tmp)
        if cfg.batch_1:
            rng = random.Random(cfg.seed)
            requests = [([rng.randint(0, cfg.max_token_id) for _ in range(cfg.batch_1_prompt)], cfg.batch_1_tokens)]
            warmup = [([rng.randint(0, cfg.max_token_id) for _ in range(cfg.batch_1_prompt)], 8)]
        else:
            requests = make_requests(cfg)
            warmup = warmup_requests(cfg)
        runs, facts = run_engine(model_dir, requests, cfg, load_format, warmup)
        hf_config = facts.pop("hf_config")
        dtype = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}.get(facts["dtype"], torch.float32)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        gbps, rgbps, tflops = measure_rates(device, dtype, hf_config.hidden_size, hf_config.intermediate_size)
        rows = list(runs)
        if cfg.batch_1:
            p, n = requests[0]
            ctx = len(p) + n / 2
            nbytes = param_bytes(hf_config, itemsize) + kv_bytes_per_token(hf_config, itemsize) * ctx
            floor_ms, read_floor_ms = nbytes / (gbps * 1e6), nbytes / (rgbps * 1e6)
            for row in runs:
                itl = row["itl_p50_ms"]
                row.update(floor_ms_per_token=_sig(floor_ms), frac_of_floor=_sig(floor_ms / itl) if itl else None,
                           read_floor_ms=_sig(read_floor_ms),
                           frac_of_read_floor=_sig(read_floor_ms / itl) if itl else None)
        else:
            ceil = ceiling(hf_config, itemsize, requests, gbps, tflops)
            read_ceil = ceiling(hf_config, itemsize, requests, rgbps, tflops)
            for name, c in (("ceiling", ceil), ("ceiling (reads)", read_ceil)):
                rows.append(dict(system=name, status="ok", requests=len(requests), elapsed_s=_sig(c["seconds"]),
                                 output_tok_s=_sig(c["output_tok_s"]), total_tok_s=_sig(c["total_tok_s"]),
                                 kv_tb=_sig(c["kv_tb"]), weight_tb=_sig(c["weight_tb"]),
                                 prefill_pflop=_sig(c["prefill_pflop"])))
            for row in runs:
                row["frac_of_ceiling"] = _sig(row["output_tok_s"] / ceil["output_tok_s"])
                row["frac_of_read_ceiling"] = _sig(row["output_tok_s"] / read_ceil["output_tok_s"])
            if cfg.hf:
                from pagoda.bench.engine_hf import run_hf
                rows += run_hf(model_dir, hf_config, requests, cfg, device, dtype)
    meta = _report.environment(device)
    meta.update(workload=dict(num_requests=cfg.num_requests, lengths=[cfg.min_len, cfg.max_len], seed=cfg.seed,
                              temperature=cfg.temperature, ignore_eos=True, max_model_len=cfg.max_model_len,
                              batch_1=cfg.batch_1, model=cfg.model or ("llama-3-8b dummy" if cfg.batch_1
                                                                       else "qwen3-0.6b dummy")),
                copy_gbps=_sig(gbps), read_gbps=_sig(rgbps), matmul_tflops=_sig(tflops), **facts)
    return {"study": "engine", "meta": meta, "backends": {}, "results": rows}


def profile_study(cfg: EngineBenchConfig, device: torch.device | None = None) -> dict:
    """``--profile``: `pagoda.bench.engine_profile.profile_decode` on the benchmark's model and requests."""
    from pagoda.bench.engine_profile import profile_decode

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, load_format, _, cfg = bench_model(cfg, tmp)
        prof = profile_decode(model_dir, cfg, load_format)
    meta = _report.environment(device)
    meta.update(running=prof["running"], steps=prof["steps"], prefill_steps=prof["prefill_steps"],
                model=cfg.model or "qwen3-0.6b dummy")
    return {"study": "engine-profile", "meta": meta, "backends": {}, "results": prof["rows"]}


def tables(report: dict, markdown: bool = False) -> str:
    rows = report["results"]
    meta = report["meta"]
    cols = ["system", "run", "requests", "elapsed_s", "output_tok_s", "total_tok_s", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms", "peak_kv_usage", "frac_of_ceiling", "frac_of_read_ceiling",
            "floor_ms_per_token", "frac_of_floor", "read_floor_ms", "frac_of_read_floor",
            "steps", "decode_steps", "prefill_step_ms", "decode_step_ms", "decode_host_ms", "decode_host_p50_ms",
            "decode_host_p90_ms", "decode_host_max_ms", "decode_host_frac", "graph_steps", "jit_builds", "jit_s",
            "kv_tb", "weight_tb", "prefill_pflop", "note"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    body = [[r.get(c) for c in cols] for r in rows]
    fmt = _report.markdown_table if markdown else _report.format_table
    head = (f"copy bandwidth {meta.get('copy_gbps')} GB/s, read {meta.get('read_gbps')} GB/s, matmul "
            f"{meta.get('matmul_tflops')} TFLOP/s; KV cache "
            f"{meta.get('kv_cache_gib')} GiB ({meta.get('num_blocks')} blocks of {meta.get('block_size')}); decode "
            f"graphs {meta.get('graph_sizes')} took {meta.get('graph_capture_mib')} MiB in "
            f"{meta.get('graph_capture_s')} s (reserved {meta.get('graph_reserve_mib')} MiB)")
    jit = [f"run {r.get('run')}: {r['jit_kernels']}" for r in rows if r.get("jit_kernels")]
    tail = ("\n\nTriton kernels built on first use inside the timed runs: " + "; ".join(jit)) if jit else ""
    return head + "\n\n" + fmt(cols, body) + tail


def plot_engine(plt, report: dict, out: Path) -> list[Path]:
    """Bars: output tokens/s of each system (the ceiling included)."""
    rows = [r for r in report["results"] if r.get("output_tok_s")]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [f"{r['system']} {r['run']}" if r.get("run") else r["system"] for r in rows]
    ax.bar(names, [r["output_tok_s"] for r in rows],
           color=["tab:green" if n.startswith("pagoda") else "tab:gray" if n.startswith("ceiling") else "tab:blue"
                  for n in names])
    ax.set_ylabel("output tokens/s")
    meta = report["meta"]
    ax.set_title(f"pagoda bench engine · {meta.get('device_name')} · {meta['workload']['model']}", fontsize=9)
    fig.tight_layout()
    path = out / "engine.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def build_parser() -> argparse.ArgumentParser:
    d = EngineBenchConfig()
    p = argparse.ArgumentParser(prog="pagoda bench engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local model folder (default: Qwen3-0.6B shapes, dummy weights)")
    p.add_argument("--load-format", default=d.load_format, choices=("auto", "dummy"),
                   help="--model's weights: auto (its safetensors) or dummy (random, its config's shapes)")
    p.add_argument("--num-requests", type=int, default=d.num_requests)
    p.add_argument("--min-len", type=int, default=d.min_len, help="shortest input and output length")
    p.add_argument("--max-len", type=int, default=d.max_len, help="longest input and output length")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers' generate")
    p.add_argument("--hf-impls", default=",".join(d.hf_impls), help="attn_implementation values for HF generate")
    p.add_argument("--budget-s", type=float, default=d.hf_budget_s,
                   help="HF generate: seconds per implementation before it stops (partial figure)")
    p.add_argument("--runs", type=int, default=d.runs,
                   help="timed passes of the workload on one engine after the warm-up (each a row)")
    p.add_argument("--batch-1", action="store_true", help="one request's decode, Llama-3-8B-shaped dummy model")
    p.add_argument("--batch-1-tokens", type=int, default=d.batch_1_tokens)
    p.add_argument("--processors", action="store_true",
                   help="logits processors: HF generate's Python processor vs pagoda's built-in, batch-level "
                        "and per-request forms, each against its own run without them")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over decode steps with every request running: device busy time vs wall")
    p.add_argument("--cascade", action="store_true",
                   help="decode over a shared 4,096-token system prompt, cascade attention on vs off")
    p.add_argument("--dtype", default=d.dtype, help="auto (bf16 on a GPU), float32, float16, bfloat16")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", help="directory for JSON, CSV, Markdown and PNG results")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = EngineBenchConfig(model=a.model, load_format=a.load_format, num_requests=a.num_requests, min_len=a.min_len,
                            max_len=a.max_len, seed=a.seed, max_model_len=a.max_model_len,
                            gpu_memory_utilization=a.gpu_memory_utilization,
                            enforce_eager=a.enforce_eager, hf=not a.no_hf,
                            hf_impls=tuple(x for x in a.hf_impls.split(",") if x), hf_budget_s=a.budget_s,
                            batch_1=a.batch_1, batch_1_tokens=a.batch_1_tokens, dtype=a.dtype, runs=a.runs)
    device = torch.device(a.device) if a.device else None
    if a.processors or a.cascade or a.profile:
        if a.profile:
            from pagoda.bench import engine_profile as sub
            name, report = "engine-profile", profile_study(cfg, device)
        elif a.processors:
            from pagoda.bench import engine_processors as sub
            name, report = "engine-processors", sub.run_study(cfg, device)
        else:
            from pagoda.bench import engine_cascade as sub
            name, report = "engine-cascade", sub.run_study()
        print(sub.tables(report))
        if a.out:
            paths = _report.write_outputs(a.out, name, report, sub.tables(report, markdown=True))
            print("\nwrote " + ", ".join(str(p) for p in paths))
        return 0
    report = run_study(cfg, device)
    print(tables(report))
    if a.out:
        from pagoda.bench.plots import _pyplot
        paths = _report.write_outputs(a.out, "engine", report, tables(report, markdown=True))
        plt = _pyplot()
        if plt is not None:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            paths += plot_engine(plt, report, Path(a.out))
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0

"""``python -m pagoda.bench.tp``: the engine at several tensor-parallel sizes on one model.

For each size in ``--tp`` (one engine after the other, in this process as rank 0):

- ``batch_1``: one request (``--prompt-len`` random ids, ``--decode-tokens`` greedy tokens, EOS ignored):
  median and p99 time per output token, from `LLMEngine.token_times`;
- ``throughput``: nano-vLLM's workload (`pagoda.bench.engine.make_requests`: ``--num-requests`` requests of
  random lengths in ``[--min-len, --max-len]``, all at once): output and total tokens/s, decode-step time;
- ``collectives`` (sizes > 1): one all-reduce of ``[batch, hidden]`` in the model dtype, timed alone on
  every rank (CUDA events, back to back), and the estimate per decode step of the model's ``2 * layers + 1``
  all-reduces (row-parallel o/down projections and the embedding) at batch 1 and at the throughput run's
  largest batch.

Models: ``--model DIR`` (its weights), or ``--shape`` (dummy weights) among `SHAPES`, with ``--num-layers``
to cut the depth (e.g. Llama-3-70B's shapes in fewer layers, to compare one GPU with two).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pagoda.bench.engine import LLAMA_3_8B, QWEN3_0_6B, EngineBenchConfig, dummy_model_dir, make_requests

LLAMA_3_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                   max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5)
SHAPES = {"llama3-8b": ("llama", LLAMA_3_8B), "llama3-70b": ("llama", LLAMA_3_70B), "qwen3-0.6b": ("qwen3", QWEN3_0_6B)}


def collective_times(worker, hidden: int, dtype: str, batches: list[int], iters: int = 50) -> dict[int, float]:
    """Microseconds of one all-reduce of ``[b, hidden]`` per ``b`` on this rank (run on every rank at once by
    ``collective_rpc``)."""
    import torch.distributed as dist

    device = worker.model_runner.device
    out = {}
    for b in batches:
        x = torch.zeros(b, hidden, dtype=getattr(torch, dtype), device=device)
        for _ in range(5):
            dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                dist.all_reduce(x)
            end.record()
            end.synchronize()
            out[b] = start.elapsed_time(end) * 1e3 / iters
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(x)
            out[b] = (time.perf_counter() - t0) * 1e6 / iters
    return out


def _engine(model: str, tp: int, args, load_format: str):
    from pagoda.engine import LLMEngine

    kw = dict(worker_multiproc_method=args.worker_multiproc_method) if tp > 1 else {}
    return LLMEngine.from_kwargs(model, load_format=load_format, dtype=args.dtype, max_model_len=args.max_model_len,
                                 gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                                 max_num_seqs=args.max_num_seqs, tensor_parallel_size=tp, **kw)


def _drive(engine, requests, tag: str, temperature: float) -> tuple[float, int]:
    """Submit ``(prompt_ids, max_tokens)`` requests at once and step until done: (seconds, largest batch)."""
    from pagoda.engine import RequestOutputKind, SamplingParams

    for j, (ids, n) in enumerate(requests):
        engine.add_request(f"{tag}{j}", {"prompt_token_ids": ids},
                           SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True,
                                          output_kind=RequestOutputKind.FINAL_ONLY))
    device = engine.model_runner.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, largest = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        largest = max(largest, len(engine.scheduler.running))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, largest


def run_size(model: str, tp: int, args, load_format: str) -> dict:
    from pagoda.engine.llm_engine import StepStats

    engine = _engine(model, tp, args, load_format)
    try:
        cfg = engine.config.hf_config
        rng = random.Random(0)
        row = dict(tp=tp, weight_mib_per_rank=[round(b / 2**20, 1) for b in engine.collective_rpc("weight_bytes")],
                   num_blocks=engine.model_runner.num_blocks)
        vocab = cfg.vocab_size
        if args.batch_1:
            _drive(engine, [([rng.randrange(vocab) for _ in range(args.prompt_len)], 8)], "w", 0.0)   # warm-up
            engine.token_times = {}
            prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]
            _drive(engine, [(prompt, args.decode_tokens)], "b", 0.0)
            times = next(iter(engine.token_times.values()))
            itl = sorted(b - a for a, b in zip(times, times[1:], strict=False))
            row["batch_1"] = dict(prompt_len=args.prompt_len, tokens=args.decode_tokens,
                                  ms_per_token_p50=round(1e3 * statistics.median(itl), 3),
                                  ms_per_token_p99=round(1e3 * itl[min(len(itl) - 1, int(0.99 * len(itl)))], 3))
        largest = 1
        if args.throughput:
            bench = EngineBenchConfig(num_requests=args.num_requests, min_len=args.min_len, max_len=args.max_len,
                                      max_token_id=min(EngineBenchConfig.max_token_id, vocab - 1))
            requests = make_requests(bench)
            _drive(engine, requests[:8], "w", bench.temperature)      # warm-up (compiles the kernels)
            engine.block_manager.reset_prefix_cache()
            engine.stats = StepStats()
            elapsed, largest = _drive(engine, requests, "t", bench.temperature)
            outs, ins = sum(n for _, n in requests), sum(len(p) for p, _ in requests)
            st = engine.stats
            row["throughput"] = dict(requests=len(requests), elapsed_s=round(elapsed, 3),
                                     output_tok_s=round(outs / elapsed, 1),
                                     total_tok_s=round((outs + ins) / elapsed, 1),
                                     decode_step_ms=round(1e3 * (st.decode_host_s + st.decode_wait_s)
                                                          / max(st.decode_steps, 1), 3),
                                     largest_batch=largest)
        if tp > 1:
            # Pickled by its module's name, also when this file runs as __main__.
            from pagoda.bench.tp import collective_times as timed

            batches = sorted({1, largest})
            per_rank = engine.collective_rpc(timed, args=(cfg.hidden_size, str(engine.model_runner.dtype)
                                                                     .removeprefix("torch."), batches))
            us = {b: max(r[b] for r in per_rank) for b in batches}
            n_ops = 2 * cfg.num_hidden_layers + 1
            row["collectives"] = dict(all_reduce_us={str(b): round(v, 2) for b, v in us.items()},
                                      all_reduces_per_step=n_ops,
                                      all_reduce_ms_per_decode_step={str(b): round(n_ops * v / 1e3, 3)
                                                                     for b, v in us.items()})
        return row
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pagoda.bench.tp", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local model folder (default: --shape with dummy weights)")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--num-layers", type=int, help="cut the model to this many layers (dummy shapes only)")
    p.add_argument("--tp", default="1,2", help="tensor-parallel sizes to run, comma-separated")
    p.add_argument("--batch-1", action="store_true", help="one request's decode latency")
    p.add_argument("--throughput", action="store_true", help="nano-vLLM's throughput workload")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--worker-multiproc-method", default="spawn", choices=["spawn", "fork"])
    p.add_argument("--out", help="write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.batch_1 or args.throughput):
        args.batch_1 = args.throughput = True
    sizes = [int(s) for s in args.tp.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model, load_format, label = args.model, "auto", args.model
        else:
            arch, spec = SHAPES[args.shape]
            spec = dict(spec, **({"num_hidden_layers": args.num_layers} if args.num_layers else {}))
            model, load_format = str(dummy_model_dir(spec, arch, Path(tmp) / args.shape)), "dummy"
            label = f"{args.shape} ({spec['num_hidden_layers']} layers, dummy weights)"
        rows = [run_size(model, tp, args, load_format) for tp in sizes]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = dict(model=label, device=device, rows=rows)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

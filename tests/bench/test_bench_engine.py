"""``pagoda bench engine`` on the CPU with a tiny model and a handful of requests: nano-vLLM's request
generator, the ceiling's bytes and FLOPs against independent counts, the report files, --batch-1 and HF."""
from __future__ import annotations

import json
import random

import pytest
import torch

from pagoda.bench import engine as eb
from tests.models.tiny import tiny_model  # noqa: F401


def test_requests_are_nano_vllm_s():
    """The same draws, in the same order, as nano-vLLM's bench.py (prompts first, then max_tokens)."""
    cfg = eb.EngineBenchConfig(num_requests=5)
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(5)]
    outs = [random.randint(100, 1024) for _ in range(5)]
    assert eb.make_requests(cfg) == list(zip(prompts, outs, strict=True))


def test_warmup_shrinks_the_batch_through_every_kind_of_size():
    """The warm-up's requests end at staggered steps: the decode batch (requests still running at each step)
    passes through sizes divisible by 16, sizes that are not, and 1; its prompts are not the timed ones."""
    cfg = eb.EngineBenchConfig(num_requests=256)
    warm = eb.warmup_requests(cfg)
    assert len(warm) == 32 and warm[-1][1] == 16
    sizes = {sum(n > t for _, n in warm) for t in range(max(n for _, n in warm))}
    assert 32 in sizes and 1 in sizes and any(b % 16 for b in sizes if b > 1), sizes
    timed = {tuple(p) for p, _ in eb.make_requests(cfg)}
    assert not any(tuple(p) in timed for p, _ in warm)
    assert all(cfg.min_len <= len(p) <= cfg.max_len for p, _ in warm)


@pytest.mark.parametrize("arch, spec", [("qwen3", eb.QWEN3_0_6B), ("llama", eb.LLAMA_3_8B)])
def test_weight_and_kv_bytes_match_the_model(arch, spec):
    """param_bytes equals the parameters of the HF model of that config (tied embeddings once); KV bytes
    per token: layers x 2 x kv heads x head_dim x itemsize."""
    import transformers

    small = {**spec, "num_hidden_layers": 2, "vocab_size": 1000}
    cls = transformers.Qwen3Config if arch == "qwen3" else transformers.LlamaConfig
    config = cls(**small)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert eb.param_bytes(config, 2) == 2 * sum(p.numel() for p in model.parameters())
    assert eb.kv_bytes_per_token(config, 2) == 2 * 2 * small["num_key_value_heads"] * 128 * 2


def test_ceiling_sums_every_step():
    """Against a step-by-step count: at step t every request with out > t reads its len(prompt) + t tokens."""
    import transformers

    config = transformers.Qwen3Config(**eb.QWEN3_0_6B)
    reqs = [([1] * 7, 3), ([1] * 2, 5), ([1] * 4, 1)]
    kvt, w = eb.kv_bytes_per_token(config, 2), eb.param_bytes(config, 2)
    kv = sum(kvt * (len(p) + t) for t in range(5) for p, out in reqs if t < out)
    flops = eb.prefill_flops(config, [7, 2, 4])
    got = eb.ceiling(config, 2, reqs, copy_gbps=1000.0, matmul_tflops=100.0)
    assert got["kv_tb"] == pytest.approx(kv / 1e12)
    assert got["weight_tb"] == pytest.approx(5 * w / 1e12)
    assert got["seconds"] == pytest.approx((kv + 5 * w) / 1e12 + flops / 1e14)
    assert got["output_tok_s"] == pytest.approx(9 / got["seconds"])
    # The attention term of one 4-token prompt: 2 matmuls x 2 FLOPs x layers x heads x head_dim x 10 pairs.
    assert eb.prefill_flops(config, [4]) - eb.prefill_flops(config, [2, 2]) == pytest.approx(
        2 * 2 * 28 * 16 * 128 * (10 - 3 - 3) - 2 * 1024 * 151936)


def test_bench_engine_cli_tiny(tiny_model, tmp_path):  # noqa: F811
    model = tiny_model("qwen3")
    out = tmp_path / "out"
    rc = eb.main(["--model", str(model), "--num-requests", "3", "--min-len", "3", "--max-len", "6",
                  "--max-model-len", "32", "--hf-impls", "sdpa", "--budget-s", "30", "--device", "cpu",
                  "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "engine.json").read_text())
    runs = [r for r in report["results"] if r["system"] == "pagoda"]
    assert [r["run"] for r in runs] == [1, 2]            # two timed passes on one engine by default
    rows = {r["system"]: r for r in report["results"]}
    assert set(rows) == {"pagoda", "ceiling", "ceiling (reads)", "hf-sdpa"}
    p = rows["pagoda"]
    assert runs[0]["decode_steps"] == runs[1]["decode_steps"]    # the same schedule: the prefix cache was emptied
    assert p["decode_host_p50_ms"] <= p["decode_host_p90_ms"] <= p["decode_host_max_ms"]
    reqs = eb.make_requests(eb.EngineBenchConfig(num_requests=3, min_len=3, max_len=6, max_token_id=383))
    outs = sum(n for _, n in reqs)
    assert p["status"] == "ok" and p["requests"] == 3
    assert p["output_tok_s"] == pytest.approx(outs / p["elapsed_s"], rel=2e-3)
    assert 0 < p["peak_kv_usage"] <= 1 and p["ttft_p50_ms"] <= p["ttft_p99_ms"]
    assert p["decode_steps"] >= max(n for _, n in reqs) - 2
    assert rows["hf-sdpa"]["status"] == "ok" and rows["hf-sdpa"]["output_tok_s"] > 0
    assert rows["ceiling"]["output_tok_s"] > 0 and report["meta"]["copy_gbps"] > 0
    # The same bytes at the read bandwidth: the two ceilings' times scale with the two rates (the FLOP term
    # apart), and each run is given as a fraction of both.
    read, copy = rows["ceiling (reads)"], rows["ceiling"]
    assert read["kv_tb"] == copy["kv_tb"] and read["weight_tb"] == copy["weight_tb"]
    assert (read["elapsed_s"] < copy["elapsed_s"]) == (report["meta"]["read_gbps"] > report["meta"]["copy_gbps"])
    for r in runs:
        assert r["frac_of_read_ceiling"] == pytest.approx(r["output_tok_s"] / read["output_tok_s"], rel=2e-3)
    assert (out / "engine.md").read_text().count("pagoda") >= 2


def test_bench_engine_batch_1_tiny(tiny_model, tmp_path):  # noqa: F811
    report = eb.run_study(eb.EngineBenchConfig(model=str(tiny_model("llama3.1")), batch_1=True, batch_1_prompt=8,
                                               batch_1_tokens=5, max_model_len=32, hf=False, runs=1),
                          torch.device("cpu"))
    (row,) = report["results"]
    assert row["requests"] == 1 and row["floor_ms_per_token"] > 0
    assert row["frac_of_floor"] == pytest.approx(row["floor_ms_per_token"] / row["itl_p50_ms"], rel=1e-3)
    assert row["frac_of_read_floor"] == pytest.approx(row["read_floor_ms"] / row["itl_p50_ms"], rel=1e-3)
    ratio = report["meta"]["copy_gbps"] / report["meta"]["read_gbps"]        # same bytes, two rates
    assert row["read_floor_ms"] == pytest.approx(row["floor_ms_per_token"] * ratio, rel=2e-3)
    assert "batch_1" in report["meta"]["workload"] and report["meta"]["workload"]["batch_1"]

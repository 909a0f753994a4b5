"""Tensor parallelism on two GPUs (NCCL, bfloat16, CUDA graphs and the one-step-ahead schedule on): greedy
tokens equal one GPU's or first differ where its two best logits are within bf16 rounding; each rank holds
about half of the weights; a killed rank brings the engine down within seconds with no process left."""
from __future__ import annotations

import gc
import os
import signal
import time

import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.executor import WorkerError

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 GPUs")]

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox jumps over the lazy dog. A paged key-value cache stores",
    "Rotary position embeddings rotate pairs of features by an angle",
    "Numbers: 0 1 2 3 4 5",
]
NEW = 12


def _run(path: str, tp: int, **kw):
    llm = LLM(path, dtype="bfloat16", max_model_len=128, gpu_memory_utilization=0.3, tensor_parallel_size=tp, **kw)
    params = SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW, logprobs=2)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    stats = llm.llm_engine.stats
    info = llm.collective_rpc("info")
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return outs, stats, info


def _pids_alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("arch", ["llama3.1", "qwen3", "mistral"])
def test_tp2_bf16_greedy_matches_tp1(arch, kv_heads, tiny_model):
    path = str(tiny_model(arch, num_key_value_heads=kv_heads))
    want, _, one = _run(path, 1)
    got, stats, info = _run(path, 2)
    assert stats.graph_steps > 0          # decode steps replayed captured graphs (all-reduces inside)
    for a, b in zip(got, want, strict=True):
        ours, ref = a.outputs[0].token_ids, b.outputs[0].token_ids
        diff = next((j for j, (x, y) in enumerate(zip(ours, ref, strict=True)) if x != y), None)
        if diff is not None:    # TP1's two best tokens there are within bf16 rounding of each other
            top = sorted((lp.logprob for lp in b.outputs[0].logprobs[diff].values()), reverse=True)[:2]
            assert top[0] - top[1] <= 4 * 2.0 ** -8 * max(abs(top[0]), 1.0) + 0.02, (diff, ours, ref)
    total = one[0]["weight_bytes"]
    assert all(0.5 * total <= i["weight_bytes"] <= 0.54 * total for i in info)
    assert info[0]["num_blocks"] == info[1]["num_blocks"] and info[1]["device"] == "cuda:1"


def test_tp2_dummy_qwen3_shapes_serve_a_batch(tmp_path):
    """A Qwen3-0.6B-shaped dummy model at TP2 with the memory profile and graphs: 64 requests complete."""
    from pagoda.bench.engine import QWEN3_0_6B, dummy_model_dir

    path = str(dummy_model_dir(QWEN3_0_6B, "qwen3", tmp_path / "qwen3"))
    llm = LLM(path, load_format="dummy", max_model_len=1024, gpu_memory_utilization=0.5, tensor_parallel_size=2)
    try:
        prompts = [{"prompt_token_ids": list(range(10 + i, 200 + i))} for i in range(64)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 32 for o in outs)
        assert llm.llm_engine.stats.graph_steps > 0
    finally:
        llm.shutdown()


def test_tp2_killed_rank_raises_within_seconds(tiny_model):
    llm = LLM(str(tiny_model("qwen3")), dtype="bfloat16", max_model_len=128, gpu_memory_utilization=0.3,
              tensor_parallel_size=2)
    pids = [i["pid"] for i in llm.llm_engine.executor.worker_info[1:]]
    killed_at = []

    def kill_rank_1(token_ids, logits):
        if len(token_ids) == 5 and not killed_at:
            os.kill(pids[0], signal.SIGKILL)
            killed_at.append(time.monotonic())
        return logits

    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, logits_processors=[kill_rank_1])
    with pytest.raises(WorkerError, match="rank 1"):
        llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert time.monotonic() - killed_at[0] < 10.0
    deadline = time.monotonic() + 10
    while _pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pids_alive(pids)

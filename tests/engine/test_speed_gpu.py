"""The engine's speed paths on a GPU: decode CUDA graphs give the eager engine's greedy tokens, reading
tokens one step behind gives the synchronous engine's, one host synchronisation per step (and none
hidden elsewhere), and ``gpu_memory_utilization=0.9`` on a Qwen3-0.6B-shaped model never runs out of
memory with its graphs and a full batch of 256."""
from __future__ import annotations

import random

import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from tests.models.tiny import ARCHS

pytestmark = pytest.mark.gpu

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox jumps over the lazy dog. A paged key-value cache stores",
    "Rotary position embeddings rotate pairs of features by an angle",
    "Numbers: 0 1 2 3 4 5",
    "A B C",
]


def _greedy(i: int) -> SamplingParams:
    n = 4 + 3 * i
    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, logprobs=2)


def _near_tie(lp: dict) -> bool:
    """The two best logprobs of a step are within float32 reordering noise."""
    best = sorted((v.logprob for v in lp.values()), reverse=True)[:2]
    return len(best) == 2 and best[0] - best[1] < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_decode_equals_eager(arch, tiny_model):
    """float32 tiny models: graph replays (padded batches 5 -> 6, 3 -> 4) and eager steps give the same
    greedy tokens, or first differ where the eager step's two best logits tie within float32 noise."""
    model_dir = str(tiny_model(arch))
    kw = dict(dtype="float32", max_model_len=128, max_num_seqs=6, gpu_memory_utilization=0.2)
    graphs = LLM(model_dir, **kw)
    assert graphs.llm_engine.model_runner.graphs.sizes == [1, 2, 4, 6]
    params = [_greedy(i) for i in range(len(PROMPTS))]
    got = graphs.generate(PROMPTS, params, use_tqdm=False)
    assert graphs.llm_engine.stats.graph_steps == graphs.llm_engine.stats.decode_steps > 0
    eager = LLM(model_dir, enforce_eager=True, **kw)
    ref = eager.generate(PROMPTS, params, use_tqdm=False)
    for g, r in zip(got, ref, strict=True):
        gt, rt = g.outputs[0].token_ids, r.outputs[0].token_ids
        if gt != rt:
            i = next(j for j, (a, b) in enumerate(zip(gt, rt, strict=True)) if a != b)
            assert _near_tie(r.outputs[0].logprobs[i]), (arch, i, gt, rt)


def test_async_scheduling_equals_sync_bf16(tiny_model):
    """bf16, graphs on: reading tokens one step behind changes nothing (same steps, same kernels)."""
    model_dir = str(tiny_model("qwen3"))
    kw = dict(dtype="bfloat16", max_model_len=128, max_num_seqs=8, gpu_memory_utilization=0.2)
    params = [SamplingParams(temperature=0.7, top_p=0.9, max_tokens=5 + 4 * i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    outs = [LLM(model_dir, async_scheduling=a, seed=3, **kw).generate(PROMPTS, params, use_tqdm=False)
            for a in (True, False)]
    assert [o.outputs[0].token_ids for o in outs[0]] == [o.outputs[0].token_ids for o in outs[1]]


def _sync_calls(prof) -> dict[str, int]:
    names = ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")
    counts = dict.fromkeys(names, 0)
    for e in prof.events():
        if e.name in counts:
            counts[e.name] += 1
    return counts


def _profiler_own_syncs() -> dict[str, int]:
    """What `torch.profiler.profile` records of its own around an empty block (its exit synchronises the
    device while it is still recording: one cudaDeviceSynchronize on torch 2.11)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pass
    return _sync_calls(prof)


def test_one_host_sync_per_decode_step(tiny_model):
    """Steady decode (graph replays and the eager path): every step waits once, on the previous step's
    tokens (cudaEventSynchronize), and nothing else synchronises (sync debug mode "error" raises on a
    blocking copy, .item(), .tolist() of a device tensor, nonzero, ...)."""
    from torch.profiler import ProfilerActivity, profile

    for eager in (False, True):
        llm = LLM(str(tiny_model("llama3.1")), dtype="bfloat16", max_model_len=256, max_num_seqs=8,
                  gpu_memory_utilization=0.2, enforce_eager=eager)
        engine = llm.llm_engine
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True,
                                                               logprobs=1 if i == 0 else None))
        for _ in range(4):           # prefill, then the first decode steps (compiles)
            engine.step()
        torch.cuda.synchronize()
        steps = 6
        torch.cuda.set_sync_debug_mode("error")
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts = _sync_calls(prof)
        own = _profiler_own_syncs()
        assert counts["cudaEventSynchronize"] == steps, counts
        assert all(counts[k] == own[k] for k in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")), \
            (counts, own)
        assert engine.stats.graph_steps == (0 if eager else engine.stats.decode_steps)
        engine.abort_request([str(i) for i in range(len(PROMPTS))])


def test_a_request_joins_the_builtin_state_without_a_sync():
    """A request bringing penalties, a logit bias, allowed tokens, bad words and min_tokens joins the built-in
    logits state while the device is busy (a long matmul queued): nothing in the join waits for the device
    (sync debug mode "error" raises on a blocking copy), and the slot holds what the request brought."""
    from pagoda.engine.logits_processors_builtin import BuiltinLogitsState
    from pagoda.engine.sequence import Sequence

    vocab, dev = 1000, torch.device("cuda")
    state = BuiltinLogitsState(vocab, dev, capacity=4)
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, logit_bias={5: 2.0, 7: -1.0},
                            allowed_token_ids=[5, 7, 9], min_tokens=3, stop_token_ids=[11])
    seq = Sequence("r", 0, [1, 2, 3, 5], params, 16, frozenset({2}), None, 0.0)
    seq.token_ids += [7, 9]                     # a request that joins late, with output tokens
    busy = torch.randn(4096, 4096, device=dev)
    torch.cuda.synchronize()
    for _ in range(20):
        busy = busy @ busy
        busy /= busy.norm()
    torch.cuda.set_sync_debug_mode("error")
    try:
        state.add_seq(1, seq, [[3, 4], [8]])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = torch.full((vocab,), float("-inf"))
    want[[5, 7, 9]] = 0.0
    want[5], want[7] = 2.0, -1.0
    assert torch.equal(state.add["logit_add"][1].cpu(), want)
    assert state.pen["output_counts"][1, [7, 9]].tolist() == [1, 1] and int(state.pen["output_counts"][1].sum()) == 2
    assert state.pen["prompt_mask"][1, [1, 2, 3, 5]].tolist() == [1] * 4 and int(state.pen["prompt_mask"][1].sum()) == 4
    assert state.stop_ids[1].tolist()[:2] == [2, 11] and int(state.num_output[1]) == 2
    words = state.bad_words[1].tolist()
    # words right-aligned in width 2; the history keeps the last (width - 1) output tokens, then a free cell
    assert words[:2] == [[3, 4], [-1, 8]] and state.last_tokens[1].tolist() == [9, -1]


def test_qwen3_0_6b_at_0_9_never_ooms(tmp_path):
    """Qwen3-0.6B shapes, dummy weights, gpu_memory_utilization=0.9: a full 256-request batch (prompts of
    100-1024 tokens, all decoding together through the graphs of every ladder size down to 1) runs; the
    capture took no more than the memory reserved for it, and the peak stays under 0.9 of the device."""
    from pagoda.bench.engine import QWEN3_0_6B, dummy_model_dir

    model_dir = dummy_model_dir(QWEN3_0_6B, "qwen3", tmp_path)
    llm = LLM(str(model_dir), load_format="dummy", max_model_len=4096, gpu_memory_utilization=0.9)
    runner = llm.llm_engine.model_runner
    assert runner.graphs is not None and runner.graphs.max_batch == 256
    assert runner.graphs.memory_bytes <= runner.graph_reserve_bytes(), (runner.graphs.memory_bytes,
                                                                        runner.graph_reserve_bytes())
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]}
               for _ in range(256)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1 + (i % 64) * 2) for i in range(256)]
    torch.cuda.reset_peak_memory_stats()
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    total = torch.cuda.mem_get_info()[1]
    assert torch.cuda.max_memory_allocated() <= 0.9 * total
    stats = llm.llm_engine.stats
    assert stats.graph_steps == stats.decode_steps > 64

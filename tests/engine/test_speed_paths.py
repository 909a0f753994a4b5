"""The engine's speed paths on the CPU: reading sampled tokens one step behind (async scheduling) and the
decode-graph path (its static buffers, padding and planning, run eagerly under the `EMULATE_ON_CPU` hook)
give the tokens of the plain synchronous engine and of HF transformers; the bookkeeping of tokens still
on the device (pending tokens, steps saved at a known length, rows dropped after a stop)."""
from __future__ import annotations

import numpy as np
import pytest

from pagoda.engine import LLM, SamplingParams, cuda_graph
from pagoda.engine.block_table import BlockTable
from pagoda.engine.cuda_graph import capture_sizes
from tests.models.tiny import ARCHS

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox jumps over the lazy dog. A paged key-value cache stores",
    "Rotary position embeddings rotate pairs of features by an angle",
    "Numbers: 0 1 2 3 4 5",
    "A B C",
]


def _tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def test_capture_sizes_ladder():
    assert capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 8))
    assert capture_sizes(12) == [1, 2, 4, 8, 12]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1000, limit=40) == [1, 2, 4, 8, 16, 24, 32, 40]


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_async_scheduling_equals_sync_and_hf(arch, tiny_model, hf_greedy):
    """Greedy tokens read one step behind equal those read at once and HF's, with varied lengths (the batch
    shrinks as requests finish), a stop token and chunked prefill mixed with decodes."""
    model_dir = tiny_model(arch)
    kw = dict(block_size=4, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=16)
    params = [SamplingParams(temperature=0, max_tokens=3 + 2 * i, min_tokens=3 + 2 * i) for i in range(len(PROMPTS))]
    a = LLM(str(model_dir), **kw)
    s = LLM(str(model_dir), async_scheduling=False, **kw)
    got_a = a.generate(PROMPTS, params, use_tqdm=False)
    got_s = s.generate(PROMPTS, params, use_tqdm=False)
    assert _tokens(got_a) == _tokens(got_s)
    tok = a.get_tokenizer()
    for prompt, out, p in zip(PROMPTS, got_a, params, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, tok.encode(prompt), p.max_tokens)
    # A stop token: the step after it was already queued for that request; its row is dropped.
    stop = got_s[4].outputs[0].token_ids[1]
    p = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop])
    one_a, one_s = a.generate(PROMPTS, p, use_tqdm=False), s.generate(PROMPTS, p, use_tqdm=False)
    assert _tokens(one_a) == _tokens(one_s)
    assert one_a[4].outputs[0].token_ids[-1] == stop and one_a[4].outputs[0].finish_reason == "stop"


def test_async_scheduling_sampling_unchanged(tiny_model):
    """Unseeded sampling (one shared random stream, logprobs, filters) is drawn in the same order: the same
    tokens whether tokens are read at once or a step behind, when no request stops early."""
    model_dir = tiny_model("llama3.1")
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=4 + i, ignore_eos=True, logprobs=2)
              for i in range(len(PROMPTS))]
    outs = []
    for async_scheduling in (True, False):
        llm = LLM(str(model_dir), block_size=4, max_model_len=64, async_scheduling=async_scheduling, seed=7)
        outs.append(llm.generate(PROMPTS, params, use_tqdm=False))
    assert _tokens(outs[0]) == _tokens(outs[1])
    for x, y in zip(outs[0], outs[1], strict=True):
        assert x.outputs[0].cumulative_logprob == pytest.approx(y.outputs[0].cumulative_logprob, abs=1e-5)


def test_pending_token_bookkeeping(tiny_model):
    """The first step returns nothing (its tokens are still on the device); a request whose pending tokens
    reach max_tokens is not scheduled again: n tokens take n model steps, none wasted."""
    llm = LLM(str(tiny_model("qwen2")), block_size=4, max_model_len=64)
    engine = llm.llm_engine
    engine.add_request("r", PROMPTS[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    seq = engine.requests["r"].seqs[0]
    assert engine.step() == []
    assert seq.num_pending_tokens == 1 and seq.num_output_tokens == 0
    assert seq.num_computed_tokens == seq.num_prompt_tokens
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
        assert seq.num_pending_tokens <= 1
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    assert engine.num_steps == 3 and seq.num_pending_tokens == 0
    assert engine.stats.steps == 3 and engine.stats.decode_steps == 2


def test_processor_reading_host_tokens_sees_every_token(tiny_model):
    """A processor without ``needs_host_tokens`` runs after the previous step's tokens are read: it sees no
    pending token and the sequence's whole output so far. One whose ``is_active`` says False is skipped."""
    llm = LLM(str(tiny_model("qwen3")), block_size=4, max_model_len=64)
    runner = llm.llm_engine.model_runner
    seen: list[tuple[int, int]] = []

    def watch(logits, seqs):
        seen.extend((s.num_pending_tokens, s.num_output_tokens) for s in seqs)
        return logits

    def never(logits, seqs):
        raise AssertionError("an inactive processor was applied")

    never.is_active = lambda seqs: False
    runner.logits_processors += [watch, never]
    try:
        out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    finally:
        runner.logits_processors.remove(watch)
        runner.logits_processors.remove(never)
    assert all(p == 0 for p, _ in seen)
    assert sorted(n for _, n in seen) == sorted([0, 1, 2, 3, 4] * 2)
    assert all(len(o.outputs[0].token_ids) == 5 for o in out)


@pytest.mark.parametrize("arch", ARCHS)
def test_emulated_decode_graphs_equal_eager_and_hf(arch, tiny_model, hf_greedy, monkeypatch):
    """The decode-graph path (static buffers, one graph-mode wrapper per ladder size, padded batches)
    gives the eager engine's and HF's greedy tokens as the batch shrinks through padded sizes."""
    monkeypatch.setattr(cuda_graph, "EMULATE_ON_CPU", True)
    model_dir = tiny_model(arch)
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=6)
    runner = llm.llm_engine.model_runner
    assert runner.graphs is not None and runner.graphs.sizes == [1, 2, 4, 6]
    params = [SamplingParams(temperature=0, max_tokens=2 + 2 * i, min_tokens=2 + 2 * i) for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    tok = llm.get_tokenizer()
    for prompt, out, p in zip(PROMPTS, outs, params, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, tok.encode(prompt), p.max_tokens)
    stats = llm.llm_engine.stats
    assert stats.graph_steps == stats.decode_steps > 0
    eager = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=6, enforce_eager=True)
    assert eager.llm_engine.model_runner.graphs is None
    assert _tokens(eager.generate(PROMPTS, params, use_tqdm=False)) == _tokens(outs)
    assert eager.llm_engine.stats.graph_steps == 0


def test_emulated_graphs_with_preemption_and_sampling(tiny_model, monkeypatch):
    """Graph decode steps between preemptions (recompute) and with seeded sampling: the outputs of the
    eager synchronous engine."""
    monkeypatch.setattr(cuda_graph, "EMULATE_ON_CPU", True)
    model_dir = tiny_model("llama3.1")
    kw = dict(block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=8, num_gpu_blocks_override=14)
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=3 + i, max_tokens=10, ignore_eos=True)
              for i in range(4)]
    graphs = LLM(str(model_dir), **kw)
    got = graphs.generate(PROMPTS[:4], params, use_tqdm=False)
    assert graphs.llm_engine.scheduler.num_preemptions > 0 and graphs.llm_engine.stats.graph_steps > 0
    plain = LLM(str(model_dir), enforce_eager=True, async_scheduling=False, **kw)
    assert _tokens(plain.generate(PROMPTS[:4], params, use_tqdm=False)) == _tokens(got)


def test_one_token_inputs_equal_the_general_path():
    """`ModelRunner._decode_inputs` (one new token a sequence) builds the same step arrays as the general loop of
    `_inputs`, on random batches mixing decodes with a pending token, decodes without, and one-token prefill
    chunks in the middle of a prompt (not sampled)."""
    import random
    import types

    from pagoda.engine import model_runner as mr

    class Seq:
        def __init__(self, sid, toks, computed, pending, table):
            self.seq_id, self.token_ids, self.num_computed_tokens = sid, toks, computed
            self.num_pending_tokens, self.block_table = pending, table

        @property
        def num_tokens(self):
            return len(self.token_ids)

    class Batch:
        is_decode_only = True

        def __init__(self, seqs):
            self.seqs, self.num_new_tokens = seqs, [1] * len(seqs)

    runner = object.__new__(mr.ModelRunner)
    runner.block_size = 16
    rng = random.Random(0)
    kinds = set()
    for _ in range(500):
        seqs, row_of = [], {}
        for i in range(rng.randint(1, 9)):
            length, pending = rng.randint(1, 80), rng.choice([0, 0, 1])
            computed = length if pending else rng.randint(0, length - 1)
            if pending:
                row_of[i] = rng.randint(0, 20)
            kinds.add("pending" if pending else "decode" if computed == length - 1 else "chunk")
            table = list(range(100 * i, 100 * i + computed // 16 + 2))
            if i % 2:   # the engine's tables (page ids kept as an array too) beside plain lists
                table = BlockTable(table)
            seqs.append(Seq(i, list(range(length)), computed, pending, table))
        batch = Batch(seqs)
        fast = runner._decode_inputs(batch, row_of)
        Batch.is_decode_only = False
        try:
            general = mr.ModelRunner._inputs(runner, batch, types.SimpleNamespace(row_of=row_of))
        finally:
            Batch.is_decode_only = True
        assert isinstance(fast["kv_indices"], np.ndarray) and fast["kv_indices"].dtype == np.int32
        as_lists = [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in d.items()} for d in (fast, general)]
        assert as_lists[0] == as_lists[1]
        want = [p for s_ in seqs for p in s_.block_table[:s_.num_computed_tokens // 16 + 1]]
        assert as_lists[0]["kv_indices"] == want
    assert kinds == {"pending", "decode", "chunk"}

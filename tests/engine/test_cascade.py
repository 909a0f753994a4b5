"""Automatic cascade attention of decode steps (`pagoda.engine.cascade`): the grouping of requests by shared
prefix pages, the measured-crossover rule of ``cascade="auto"``, and a three-level engine case (system
prompt, two conversations, turns) whose greedy tokens equal the plain engine's and HF's."""
from __future__ import annotations

import pytest

from pagoda.engine import LLM, SamplingParams, cuda_graph
from pagoda.engine.cascade import (
    CascadeGraphBuffers,
    cascade_graph_sizes,
    cascade_groups,
    cascade_pays,
    graph_layout,
    group_shared_prefixes,
    should_cascade,
)
from pagoda.engine.config import EngineConfig


@pytest.mark.parametrize(("tokens", "size", "pays"), [
    (4096, 128, True), (4096, 127, False), (16384, 127, False), (16384, 128, True), (32768, 32, True),
    (32768, 31, False), (131072, 32, True), (4095, 100_000, False), (1024, 512, False), (0, 2, False)])
def test_cascade_pays_follows_the_measured_crossover(tokens, size, pays):
    assert cascade_pays(tokens, size) is pays


def _tables(prefixes: list[list[int]], first_free: int = 1000, own: int = 2) -> list[list[int]]:
    """Block tables: each prefix (shared page ids) then ``own`` fresh pages."""
    tables, nxt = [], first_free
    for p in prefixes:
        tables.append(list(p) + list(range(nxt, nxt + own)))
        nxt += own
    return tables


def _check_levels(groups, tables, pages, lasts):
    """Every request's pages, level by level, are its own block table; level queries add up."""
    assert sorted(groups.order) == list(range(len(tables)))
    per_row = {r: [] for r in groups.order}
    for level in groups.levels:
        assert sum(nq for nq, _, _ in level) == len(tables)
        rows = iter(groups.order)
        for nq, p, _ in level:
            for _ in range(nq):
                per_row[next(rows)] += p
    for r, got in per_row.items():
        assert got == tables[r][:pages[r]]
    assert [lpl for _, _, lpl in groups.levels[-1]] == [lasts[r] for r in groups.order]


def test_grouping_three_levels_and_order():
    system = list(range(8))
    conv_a, conv_b = list(range(100, 104)), list(range(200, 206))
    prefixes = [system + conv_a, [500, 501], system + conv_b, system + conv_a, system + conv_b, system, []]
    tables = _tables(prefixes)
    pages = [len(t) for t in tables]
    lasts = [3, 16, 1, 7, 16, 2, 5]
    groups = group_shared_prefixes(tables, pages, lasts, 16)
    assert groups.num_levels == 3
    _check_levels(groups, tables, pages, lasts)
    # Requests sharing the system prompt are adjacent, conversations adjacent within it.
    assert groups.order == [0, 3, 2, 4, 5, 1, 6]
    assert [(nq, len(p)) for nq, p, _ in groups.levels[0]] == [(5, 8), (1, 0), (1, 0)]
    assert [(nq, len(p)) for nq, p, _ in groups.levels[1]] == [(2, 4), (2, 6), (1, 0), (1, 0), (1, 0)]
    assert sorted(groups.shared) == sorted([(8 * 16, 5), (12 * 16, 2), (14 * 16, 2)])


def test_grouping_two_levels_last_page_never_shared():
    # The third request's page 8 is not its last: shared; its page 12 is being written: its own.
    tables = [[7, 8, 9, 10], [7, 8, 13, 11], [7, 8, 12]]
    groups = group_shared_prefixes(tables, [4, 4, 3], [16, 1, 4], 16)
    assert groups.num_levels == 2
    assert groups.levels[0] == [(3, [7, 8], 16)]
    assert groups.shared == [(32, 3)]
    _check_levels(groups, tables, [4, 4, 3], [16, 1, 4])
    # A shared last page (the one written this step) is not a shared prefix.
    assert group_shared_prefixes([[7], [7]], [1, 1], [3, 4], 16) is None
    assert group_shared_prefixes([[1, 2], [3, 4]], [2, 2], [1, 1], 16) is None


def test_grouping_unequal_middle_page():
    # Same first and third page, different second page: only the first is shared.
    tables = [[1, 2, 3, 9], [1, 5, 3, 10]]
    groups = group_shared_prefixes(tables, [4, 4], [1, 1], 4)
    assert groups.levels[0] == [(2, [1], 4)]
    _check_levels(groups, tables, [4, 4], [1, 1])


@pytest.mark.parametrize(("mode", "batch", "shared_pages", "expected"), [
    ("auto", 128, 256, True), ("auto", 127, 256, False), ("auto", 32, 2048, True), ("auto", 31, 2048, False),
    ("auto", 512, 255, False), ("on", 2, 1, True), ("off", 512, 4096, False)])
def test_auto_decisions_on_synthetic_groups(mode, batch, shared_pages, expected):
    """page_size 16: 256 pages = 4k tokens, 2048 = 32k."""
    tables = _tables([list(range(shared_pages))] * batch, first_free=10**6)
    groups = group_shared_prefixes(tables, [len(t) for t in tables], [1] * batch, 16)
    assert should_cascade(mode, groups) is expected


@pytest.mark.parametrize("batch", [31, 32, 127, 128])
@pytest.mark.parametrize("shared_pages", [255, 256, 2047, 2048])
def test_cascade_groups_equals_the_full_decision(batch, shared_pages):
    """`cascade_groups`' O(batch) pre-check never turns down a step the full grouping would cascade."""
    tables = _tables([list(range(shared_pages))] * batch + [[5]] * 3, first_free=10**6)
    args = (tables, [len(t) for t in tables], [1] * len(tables), 16)
    for mode in ("auto", "on", "off"):
        got = cascade_groups(mode, *args)
        assert (got is not None) is should_cascade(mode, group_shared_prefixes(*args))


def test_auto_decision_counts_a_subgroup():
    # 40 requests share 1 page; 32 of them share 32k tokens below it: the subgroup passes the rule.
    deep = [0] + list(range(1, 2048))
    tables = _tables([deep] * 32 + [[0]] * 8, first_free=10**6)
    groups = group_shared_prefixes(tables, [len(t) for t in tables], [1] * 40, 16)
    assert groups.num_levels == 3 and should_cascade("auto", groups)
    assert (2048 * 16, 32) in groups.shared


def test_cascade_config_validated(tiny_model):
    with pytest.raises(ValueError, match="cascade"):
        EngineConfig(str(tiny_model("qwen3")), cascade="always")
    with pytest.raises(TypeError, match="cascade"):
        EngineConfig(str(tiny_model("qwen3")), cascade=True)


def _conversations():
    """Token ids: a 12-token system prompt, two conversations of 8 more tokens, and five turns."""
    system = [(7 * i + 3) % 50 + 5 for i in range(12)]
    conv = {"a": [60 + i for i in range(8)], "b": [90 - i for i in range(8)]}
    turns = [("a", [11, 12, 13]), ("b", [21, 22, 23, 24, 25]), ("a", [31, 32, 33, 34]), ("b", [41, 42]),
             ("b", [51, 52, 53, 54, 55, 56])]
    warm = [system + conv["a"], system + conv["b"]]
    prompts = [system + conv[c] + t for c, t in turns] + [[70, 71, 72, 73, 74, 75, 76]]   # + one unrelated
    return warm, prompts


@pytest.mark.parametrize("graphs", [False, True])
def test_three_levels_equal_plain_engine_and_hf(graphs, tiny_model, hf_greedy, monkeypatch):
    """System prompt, two conversations and their turns: the decode steps run three cascade levels (the
    conversations' pages cached by earlier requests), and the greedy tokens equal the plain engine's and
    HF's. With the decode graphs (emulated), the cascade steps run eagerly and the others replay."""
    monkeypatch.setattr(cuda_graph, "EMULATE_ON_CPU", graphs)
    model_dir = str(tiny_model("qwen3"))
    warm, prompts = _conversations()
    kw = dict(block_size=4, max_model_len=64, max_num_seqs=8, async_scheduling=not graphs)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = {}
    for mode in ("on", "off"):
        llm = LLM(model_dir, cascade=mode, **kw)
        llm.generate([{"prompt_token_ids": p} for p in warm], SamplingParams(max_tokens=1), use_tqdm=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        got[mode] = [o.outputs[0].token_ids for o in outs]
        runner = llm.llm_engine.model_runner
        if mode == "on":
            assert runner.cascade_steps.get(3, 0) >= 4, runner.cascade_steps
            assert all(o.num_cached_tokens == 20 for o in outs[:5])
        else:
            assert runner.cascade_steps == {}
    assert got["on"] == got["off"]
    for p, toks in zip(prompts, got["on"], strict=True):
        assert toks == hf_greedy(model_dir, p, 6)


def test_graph_layout_puts_sharing_groups_first():
    """A two-level step for a CUDA-graph cascade: rows of groups that share pages first (in group order),
    rows sharing nothing after them; each row keeps its own pages."""
    tables = [[9, 1, 2], [5, 6], [9, 1, 3, 4], [7, 8, 1], [9, 1, 5]]
    groups = group_shared_prefixes(tables, [3, 2, 4, 3, 3], [1, 2, 3, 4, 1], page_size=4)
    assert groups.num_levels == 2
    order, shared, own = graph_layout(groups)
    assert order == [0, 2, 4, 1, 3]
    assert shared == [(3, [9, 1], 4)]
    assert own == [([2], 1), ([3, 4], 3), ([5], 1), ([5, 6], 2), ([7, 8, 1], 4)]


def test_cascade_graph_sizes():
    # a sharing group holds two rows at least: a graph of b rows plans b // 2 groups, 8 at most
    assert [CascadeGraphBuffers.capacity(b) for b in (1, 2, 5, 8, 16, 64)] == [1, 1, 2, 4, 8, 8]
    sizes = [1, 2, 4, 8, 16, 24, 32, 40]
    assert cascade_graph_sizes("on", sizes) == sizes[1:]
    assert cascade_graph_sizes("off", sizes) == cascade_graph_sizes("auto", sizes) == []


def test_two_level_cascade_graphs_equal_plain_engine_and_hf(tiny_model, hf_greedy, monkeypatch):
    """A system prompt shared by six requests of ragged turns, plus one unrelated request: with the decode
    graphs (emulated) every decode step replays a graph, the cascade ones the cascade graph of their padded
    size (the batch of 7 shrinks through the sizes 8, 4 and 2 as requests end), and the greedy tokens equal the plain
    engine's and HF's."""
    monkeypatch.setattr(cuda_graph, "EMULATE_ON_CPU", True)
    model_dir = str(tiny_model("qwen3"))
    system = [(7 * i + 3) % 50 + 5 for i in range(12)]
    turns = [[11, 12, 13], [21, 22, 23, 24, 25], [31, 32, 33, 34], [41, 42], [51, 52, 53, 54, 55, 56], [61]]
    prompts = [[70, 71, 72, 73, 74, 75, 76]] + [system + t for t in turns]
    params = [SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True) for i in range(len(prompts))]
    kw = dict(block_size=4, max_model_len=64, max_num_seqs=8)
    got = {}
    for mode in ("on", "off"):
        llm = LLM(model_dir, cascade=mode, **kw)
        llm.generate([{"prompt_token_ids": system + [5]}], SamplingParams(max_tokens=1), use_tqdm=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        got[mode] = [o.outputs[0].token_ids for o in outs]
        runner, stats = llm.llm_engine.model_runner, llm.llm_engine.stats
        assert stats.graph_steps == stats.decode_steps > 0
        if mode == "on":
            assert runner.graphs.cascade_sizes == [2, 4, 8]
            assert runner.cascade_steps.get(2, 0) >= 5 and 3 not in runner.cascade_steps, runner.cascade_steps
            assert all(o.num_cached_tokens == 12 for o in outs[1:])
        else:
            assert runner.cascade_steps == {} and runner.graphs.cascade_sizes == []
    assert got["on"] == got["off"]
    for p, prm, toks in zip(prompts, params, got["on"], strict=True):
        assert toks == hf_greedy(model_dir, p, prm.max_tokens)


def several_groups_workload():
    """Three system prompts of 12 tokens, each under four requests with ragged turns, and two unrelated requests
    (``(prefixes, prompts, max_tokens)``): decode steps with three sharing groups and rows that share nothing."""
    prefixes = [[(7 * i + 3 + 11 * g) % 50 + 5 for i in range(12)] for g in range(3)]
    prompts, max_tokens = [], []
    for g, prefix in enumerate(prefixes):
        for j in range(4):
            prompts.append(prefix + [60 + 5 * g + j] * (1 + j))
            max_tokens.append(3 + (g + 2 * j) % 5)
    prompts += [[70, 71, 72, 73, 74, 75, 76], [80, 81, 82]]
    max_tokens += [6, 4]
    return prefixes, prompts, max_tokens


def run_several_groups(model_dir: str, mode: str, logprobs: int | None = None, **kw):
    """Greedy outputs (`CompletionOutput`) of `several_groups_workload` under ``cascade=mode`` (prefixes cached
    first); the LLM too."""
    prefixes, prompts, max_tokens = several_groups_workload()
    llm = LLM(model_dir, cascade=mode, **kw)
    llm.generate([{"prompt_token_ids": p + [5]} for p in prefixes], SamplingParams(max_tokens=1), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs) for n in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs], llm


def test_cascade_graphs_with_several_groups(tiny_model, monkeypatch):
    """Three sharing groups and two rows that share nothing, in a batch of 14 padded to 16: every decode step
    replays a graph (the cascade ones with three groups' shared pages), and the tokens equal the plain
    engine's."""
    monkeypatch.setattr(cuda_graph, "EMULATE_ON_CPU", True)
    model_dir = str(tiny_model("llama3.1"))
    kw = dict(block_size=4, max_model_len=64, max_num_seqs=16)
    got, llm = run_several_groups(model_dir, "on", **kw)
    runner, stats = llm.llm_engine.model_runner, llm.llm_engine.stats
    assert runner.cascade_steps.get(2, 0) >= 3 and stats.graph_steps == stats.decode_steps
    plain, _ = run_several_groups(model_dir, "off", **kw)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]

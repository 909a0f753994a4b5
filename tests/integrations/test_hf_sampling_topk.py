"""The top-k path of pagoda's HF warpers (`pagoda.integrations.hf_topk`): HF's Temperature -> TopK -> TopP -> MinP
chain from one torch.topk, checked against HF's own warpers on rows full of ties (at the k-th value, beyond what
topk returns, and straddling the top-p boundary); draws follow HF's distribution; no vocabulary sort; a short
launch list; generate with the switch gives HF's tokens, seed for seed; beam search untouched."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pagoda.integrations import hf_sampling as hs  # noqa: E402
from pagoda.integrations import hf_topk  # noqa: E402
from tests.integrations.hf_helpers import generate, hf_chain, stable_sort  # noqa: E402

NEG = float("-inf")


def _hf(scores, temperature, top_k, top_p, min_p, monkeypatch):
    """HF's chain with a stable sort (CUDA's sort of a long row is stable; it cuts a tie group at its lowest
    indices, the definite rule pagoda follows)."""
    with monkeypatch.context() as m:
        stable_sort(m)
        return hf_chain(temperature, top_k, top_p, min_p)(None, scores.clone())


def _tie_rows(n: int, vocab: int, seed: int) -> torch.Tensor:
    """[n, vocab] integer-valued logits from a few levels: large tie groups everywhere, -inf in some rows."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(2, 7, (n, 1), generator=g)
    x = (torch.rand(n, vocab, generator=g) * levels).floor() * torch.rand(n, 1, generator=g).mul(2).add(0.25)
    x[::5, :vocab // 3] = NEG
    return x


def _boundary_cases(x, k, top_p):
    """Per row: whether topk left ties with the k-th out, and whether HF's top-p boundary falls among them."""
    v = torch.topk(x, k).values
    extra = (x >= v[:, -1:]).sum(-1) - k
    p = torch.softmax(x.double().masked_fill(x < v[:, -1:], NEG), -1)
    above_kth = torch.where(x > v[:, -1:], p, 0).sum(-1)
    return extra > 0, (extra > 0) & (above_kth < top_p)


# top_p values off exact multiples of 1/n (HF's float32 cumsum of n equal terms lands either side of them).
CONFIGS = [(None, 8, 0.6180, None), (0.7, 20, 0.9037, None), (1.3, 5, 0.3071, 0.15), (None, 12, None, 0.3),
           (None, 30, 0.8123, 0.02), (None, 3, None, None), (0.5, 24, 0.5071, None), (None, 1, 0.9037, None)]


@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_kept_set_equals_hf_chain_on_tie_rows(case, monkeypatch):
    config = CONFIGS[case]
    x = _tie_rows(200, 64, seed=case)
    out = hf_topk.topk_warp(x, *config)
    ref = _hf(x, *config, monkeypatch)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert torch.equal(out, ref)                                   # the scaled logits, bit for bit
    if config[2] is not None and config[1] > 1:                    # the hard cases are present
        left_out, boundary_there = _boundary_cases(x if config[0] is None else x / config[0], config[1], config[2])
        assert left_out.sum() >= 20 and boundary_there.sum() >= 5, (int(left_out.sum()), int(boundary_there.sum()))


def test_spread_rows_and_edge_shapes(monkeypatch):
    """Float logits (no ties), top_k >= vocab, a row whose top-k reaches -inf, 3-D scores through warp_logits."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 500, generator=g) * 3
    x[3, 5:] = NEG                                                 # 5 finite tokens, top_k 50 reaches -inf
    for config in [(None, 50, 0.9037, None), (0.8, 600, 0.7, 0.01), (None, 500, None, 0.0), (2.0, 50, None, 0.2)]:
        out = hf_topk.topk_warp(x, *config)
        assert torch.equal(out, _hf(x, *config, monkeypatch)), config
    out3 = hs.warp_logits(x[:, None], temperature=0.8, top_k=40, top_p=0.9)
    assert out3.shape == (16, 1, 500)
    assert torch.equal(out3[:, 0], _hf(x, 0.8, 40, 0.9, None, monkeypatch))


def test_draws_follow_hf_distribution_on_tie_rows(monkeypatch):
    """HF's own draw (softmax, multinomial) from pagoda's output on rows with ties at the k-th value and at the
    top-p boundary: tokens outside HF's kept set never drawn; counts within binomial bounds and chi-square."""
    x = _tie_rows(10, 64, seed=11)
    config = (None, 10, 0.6180, 0.05)
    _, boundary_there = _boundary_cases(x, 10, 0.6180)
    assert boundary_there.any()
    out = hs.warp_logits(x, *config)
    target = _hf(x, *config, monkeypatch).double().softmax(-1)
    n = 20000
    draws = torch.multinomial(torch.softmax(out, -1), n, replacement=True, generator=torch.Generator().manual_seed(5))
    for r in range(x.shape[0]):
        counts = torch.bincount(draws[r], minlength=64).double()
        assert counts[target[r] == 0].sum() == 0, f"row {r}: a token outside HF's kept set was drawn"
        expected = n * target[r]
        assert ((counts - expected).abs() <= 5 * (expected * (1 - target[r])).sqrt() + 3).all(), f"row {r}"
        cells = expected >= 5
        chi2 = float(((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum())
        df = max(int(cells.sum()) - 1, 1)
        assert chi2 < df + 6 * (2 * df) ** 0.5 + 10, f"row {r}: chi-square {chi2:.1f} over {df} degrees of freedom"


class _Ops(TorchDispatchMode):
    """The aten ops a call dispatches (each a kernel launch on CUDA), views left out."""
    VIEWS = {"slice", "view", "alias", "unsqueeze", "select", "detach", "_unsafe_view", "expand", "squeeze"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_no_vocabulary_sort_and_a_short_launch_list(monkeypatch):
    """The top-k path never sorts: one topk, then ~30 small or elementwise ops (top-k alone: HF's three)."""
    x = torch.randn(1, 151936) * 3
    for name in ("sort", "argsort"):
        monkeypatch.setattr(torch, name, lambda *a, **k: pytest.fail("a sort ran"))
    with _Ops() as only_k:
        hf_topk.topk_warp(x, None, 50)
    assert only_k.ops == ["topk", "lt", "masked_fill"]
    with _Ops() as k_p:
        hf_topk.topk_warp(x, None, 50, 0.9)
    assert k_p.ops.count("topk") == 1 and "sort" not in k_p.ops and len(k_p.ops) <= 30, k_p.ops


def test_falls_back_to_pagoda_ops_without_top_k(monkeypatch):
    calls = []
    monkeypatch.setattr(hf_topk, "topk_warp", lambda *a, **k: calls.append(1))
    hs.warp_logits(torch.randn(2, 100), top_p=0.9)
    hs.warp_logits(torch.randn(2, 100), top_k=0, min_p=0.1)
    assert calls == []


# --- generate -------------------------------------------------------------------------------------------------

def test_generate_seeded_runs_reproduce_hf_tokens(tiny_model):
    """Same seed, same tokens: run to run, and as HF's warpers (HF's multinomial draws from the same scores)."""
    kw = dict(do_sample=True, top_k=40, top_p=0.85, temperature=0.7, min_p=0.01)
    hf = generate(tiny_model, 21, 6, **kw)
    with hs.sampling(True):
        first, second = generate(tiny_model, 21, 6, **kw), generate(tiny_model, 21, 6, **kw)
        other = generate(tiny_model, 22, 6, **kw)
    assert torch.equal(first, second) and torch.equal(first, hf) and not torch.equal(first, other)


def test_beam_search_untouched(tiny_model, monkeypatch):
    calls = []
    real = hf_topk.topk_warp
    monkeypatch.setattr(hf_topk, "topk_warp", lambda *a, **k: calls.append(1) or real(*a, **k))
    beam = generate(tiny_model, 4, 6, do_sample=False, num_beams=2)
    beam_sample = generate(tiny_model, 4, 6, do_sample=True, num_beams=2, top_k=20, top_p=0.9)
    with hs.sampling(True):
        assert torch.equal(generate(tiny_model, 4, 6, do_sample=False, num_beams=2), beam)
        assert torch.equal(generate(tiny_model, 4, 6, do_sample=True, num_beams=2, top_k=20, top_p=0.9), beam_sample)
    assert calls == []                     # beam sampling keeps 2 tokens at least: HF's own warpers stay


# --- GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4, 64])
def test_gpu_graph_replay_equals_ops_and_hf(batch, monkeypatch):
    """Qwen vocabulary, bf16-rounded logits: the replayed graph (small batch) equals the eager ops on new logits
    every call, and both equal HF's chain where no top-p boundary lands within float32 rounding (top-k alone)."""
    hf_topk.clear_graphs()
    g = torch.Generator(device="cuda").manual_seed(batch)
    config = (0.8, 50, 0.9, 0.02)
    for step in range(3):
        x = (torch.randn(batch, 151936, device="cuda", generator=g) * 2.5).bfloat16().float()
        out = hf_topk.topk_warp(x, *config)
        assert torch.equal(out, hf_topk._warp(x, *config)), step
        assert torch.equal(hf_topk.topk_warp(x, None, 50), _hf(x, None, 50, None, None, monkeypatch))
    graphed = batch * 151936 <= hf_topk.GRAPH_MAX_ELEMENTS
    assert any(e is not None for e in hf_topk._graphs.values()) == graphed
    hf_topk.clear_graphs()


@pytest.mark.gpu
def test_gpu_inside_an_outer_capture_runs_the_ops():
    """Under a caller's CUDA-graph capture the ops themselves are captured (no nested capture, no host sync)."""
    hf_topk.clear_graphs()
    static = torch.randn(2, 151936, device="cuda") * 3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        hf_topk._warp(static, None, 50, 0.9, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = hf_topk.topk_warp(static, None, 50, 0.9, None)
    fresh = torch.randn(2, 151936, device="cuda") * 3
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, hf_topk._warp(fresh, None, 50, 0.9, None)) and not hf_topk._graphs

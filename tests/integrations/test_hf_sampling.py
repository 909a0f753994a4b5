"""pagoda's sorting-free warpers inside HF ``generate`` (`pagoda.integrations.hf_sampling`) against HF's own
``Temperature -> TopK -> TopP -> MinP`` warper chain: the same kept sets and probabilities, draws that follow HF's
distribution, ``generate`` using them after the switch, greedy untouched, one graph under torch.compile."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.generation import logits_process as lp  # noqa: E402

from pagoda.integrations import hf_sampling as hs  # noqa: E402
from pagoda.integrations import transformers as pt  # noqa: E402
from tests.integrations.hf_helpers import generate, hf_chain, stable_sort  # noqa: E402

V = 1000
# (temperature, top_k, top_p, min_p); top_p values keep the flat row's boundary off an exact multiple of 1/V.
CONFIGS = [(None, 50, 0.9037, None), (None, None, 0.9037, None), (0.7, None, 0.8123, None), (1.3, 20, 0.5071, 0.1),
           (None, None, None, 0.2), (None, 3, None, None), (0.5, None, None, None), (None, 50, 0.9037, 0.05)]


def _logits(seed: int = 0) -> torch.Tensor:
    """[8, V] float32: spread and peaked rows, integer-valued rows (many ties, at the top-p boundary too), a flat
    row, bf16-rounded logits (ties as a bf16 model gives them) and a row with -inf entries (earlier processors)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, V, generator=g) * 3
    x[1] = torch.randint(0, 6, (V,), generator=g).float()
    x[2] = 0.0
    x[3, :10] += 20
    x[4] = (torch.randn(V, generator=g) * 2).bfloat16().float()
    x[5, torch.randperm(V, generator=g)[:400]] = float("-inf")
    x[6] = torch.randint(0, 3, (V,), generator=g).float() * 0.5
    x[7] = torch.randn(V, generator=g) * 0.3
    return x


@pytest.mark.parametrize("config", CONFIGS)
def test_kept_set_and_probabilities_equal_hf_chain(config, monkeypatch):
    x = _logits()
    out = hs.warp_logits(x, *config)
    stable_sort(monkeypatch)
    ref = hf_chain(*config)(None, x.clone())
    kept = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), kept)
    assert torch.equal(out[kept], ref[kept])                      # the scaled logits, bit for bit
    assert (out[~kept] == float("-inf")).all()
    torch.testing.assert_close(out.double().softmax(-1), ref.double().softmax(-1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("top_p", [0.9037, 0.8123, 0.5071, 0.3071])
def test_ties_at_the_top_p_boundary_keep_hf_count_under_its_own_sort(top_p):
    """Against HF as it runs here (the CPU's unstable sort): the same number of tokens and the same mass kept;
    the sets differ only inside the tie group at the boundary."""
    x = _logits(1)
    out = hs.warp_logits(x, top_p=top_p)
    ref = lp.TopPLogitsWarper(top_p)(None, x.clone())
    ko, kr = torch.isfinite(out), torch.isfinite(ref)
    assert torch.equal(ko.sum(-1), kr.sum(-1))
    p = x.double().softmax(-1)
    torch.testing.assert_close((p * ko).sum(-1), (p * kr).sum(-1), rtol=0, atol=1e-9)
    for r in range(x.shape[0]):
        differ = (ko[r] ^ kr[r]).nonzero().flatten()
        if differ.numel():
            assert (x[r, differ] == x[r, differ[0]]).all(), f"row {r}: tokens outside one tie group differ"


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3], CONFIGS[4]])
def test_draws_follow_hf_distribution(config, monkeypatch):
    """HF's own draw (softmax, then multinomial) from pagoda's output, 20k per row: tokens outside HF's kept set
    never drawn, per-token counts within binomial bounds of HF's exact probabilities, chi-square far from its tail."""
    x = _logits(2)
    out = hs.warp_logits(x, *config)
    stable_sort(monkeypatch)
    target = hf_chain(*config)(None, x.clone()).double().softmax(-1)
    n = 20000
    g = torch.Generator().manual_seed(7)
    draws = torch.multinomial(torch.softmax(out, dim=-1), n, replacement=True, generator=g)
    for r in range(x.shape[0]):
        counts = torch.bincount(draws[r], minlength=V).double()
        assert counts[target[r] == 0].sum() == 0, f"row {r}: a token outside HF's kept set was drawn"
        expected = n * target[r]
        assert ((counts - expected).abs() <= 5 * (expected * (1 - target[r])).sqrt() + 3).all(), f"row {r}"
        cells = expected >= 5
        chi2 = float(((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum())
        df = max(int(cells.sum()) - 1, 1)
        assert chi2 < df + 6 * (2 * df) ** 0.5 + 10, f"row {r}: chi-square {chi2:.1f} over {df} degrees of freedom"


def test_swap_replaces_only_hf_warpers_it_reproduces():
    rep = lp.RepetitionPenaltyLogitsProcessor(1.1)
    chain = [rep, lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(50), lp.TopPLogitsWarper(0.9),
             lp.MinPLogitsWarper(0.05)]
    out = hs.swap_warpers(chain)
    assert len(out) == 2 and out[0] is rep and isinstance(out[1], hs.PagodaLogitsWarper)
    assert (out[1].temperature, out[1].top_k, out[1].top_p, out[1].min_p) == (0.7, 50, 0.9, 0.05)
    # Beam sampling keeps more than one token, a custom filter value, top_p=1: HF's own warpers stay.
    kept = [lp.TopKLogitsWarper(50, min_tokens_to_keep=2), lp.TopPLogitsWarper(0.9, filter_value=-1e4),
            lp.TopPLogitsWarper(1.0)]
    for proc in kept:
        assert list(hs.swap_warpers([proc])) == [proc]
    # Another warper between two of the chain splits it; the order of application is kept.
    typical = lp.TypicalLogitsWarper(0.9)
    out = hs.swap_warpers([lp.TopKLogitsWarper(20), typical, lp.TopPLogitsWarper(0.8)])
    assert [type(p) for p in out] == [hs.PagodaLogitsWarper, lp.TypicalLogitsWarper, hs.PagodaLogitsWarper]
    assert (out[0].top_k, out[0].top_p, out[2].top_k, out[2].top_p) == (20, None, None, 0.8)


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 10)
    for kw, err, name in [({"top_p": 0.0}, ValueError, "top_p"), ({"top_p": 1.5}, ValueError, "top_p"),
                          ({"top_k": -1}, ValueError, "top_k"), ({"top_k": 2.5}, TypeError, "top_k"),
                          ({"min_p": 1.5}, ValueError, "min_p"), ({"temperature": 0.0}, ValueError, "temperature")]:
        with pytest.raises(err, match=name):
            hs.warp_logits(x, **kw)
        with pytest.raises(err, match=name):
            hs.PagodaLogitsWarper(**kw)
    with pytest.raises(TypeError, match="scores"):
        hs.warp_logits(torch.arange(10), top_k=2)


def test_warper_is_one_graph_under_torch_compile():
    """fullgraph=True: a graph break inside the warper would raise. The compiled call equals the eager one;
    3-D scores (batch, 1, vocab) keep their shape; the output never aliases the input."""
    torch._dynamo.reset()
    warper = hs.PagodaLogitsWarper(temperature=0.8, top_k=40, top_p=0.9037, min_p=0.02)
    compiled = torch.compile(lambda s: warper(None, s), fullgraph=True, backend="aot_eager")
    x = _logits(3)
    assert torch.equal(compiled(x), warper(None, x))
    assert torch.equal(compiled(x[:, None]), warper(None, x)[:, None])
    only_t = hs.PagodaLogitsWarper()
    assert only_t(None, x).data_ptr() != x.data_ptr() and torch.equal(only_t(None, x), x)


# --- generate -------------------------------------------------------------------------------------------------

@pytest.fixture
def spies(monkeypatch):
    """Counts of pagoda's sorting-free paths (the top-k one, pagoda's ops without top-k). Pagoda sampling off
    after."""
    calls = {"topk_warp": 0, "top_k_mask_logits": 0, "top_p_renorm_probs": 0}
    for module, name in [(hs._topk, "topk_warp"), (hs._ops, "top_k_mask_logits"), (hs._ops, "top_p_renorm_probs")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _r=real, **kw: calls.__setitem__(_n, calls[_n] + 1)
                            or _r(*a, **kw))
    yield calls
    hs.disable()


def test_generate_samples_through_pagoda_with_hf_tokens(tiny_model, spies, monkeypatch):
    """After ``register(sampling=True)`` HF's top-k/top-p warpers never run, pagoda's top-k path runs once per step,
    and
    with the same seed generate gives HF's tokens and HF's processed scores (HF's multinomial draws from the same
    logits)."""
    kw = dict(do_sample=True, top_k=50, top_p=0.9, output_scores=True, output_logits=True,
              return_dict_in_generate=True)
    hf = generate(tiny_model, 5, 8, **kw)
    pt.register(sampling=True)
    assert hs.is_enabled()
    for cls in (lp.TopKLogitsWarper, lp.TopPLogitsWarper):
        monkeypatch.setattr(cls, "__call__", lambda *a, **k: pytest.fail("HF's sorting warper ran"))
    pg = generate(tiny_model, 5, 8, **kw)
    assert spies == {"topk_warp": 8, "top_k_mask_logits": 0, "top_p_renorm_probs": 0}
    assert ((pg.sequences >= 0) & (pg.sequences < tiny_model.config.vocab_size)).all()
    assert torch.equal(pg.sequences, hf.sequences)
    for a, b in zip(pg.scores, hf.scores, strict=True):
        assert torch.equal(a, b)
    hs.disable()
    assert not hs.is_enabled()


def test_greedy_and_do_sample_false_are_untouched(tiny_model, spies):
    base = generate(tiny_model, 3, 8, do_sample=False)
    with hs.sampling(True):
        greedy = generate(tiny_model, 3, 8, do_sample=False)
        ignored = generate(tiny_model, 3, 8, do_sample=False, top_k=5, top_p=0.5)   # HF ignores them without sampling
    assert torch.equal(greedy, base) and torch.equal(ignored, base)
    assert spies == {"topk_warp": 0, "top_k_mask_logits": 0, "top_p_renorm_probs": 0}
    assert not hs.is_enabled()


def test_custom_generate_callable(tiny_model, spies):
    """HF's per-call hook: ``custom_generate=hf_sampling.generate`` without the global switch."""
    hf = generate(tiny_model, 9, 8, do_sample=True, top_k=30, top_p=0.8, temperature=0.7)
    pg = generate(tiny_model, 9, 8, do_sample=True, top_k=30, top_p=0.8, temperature=0.7,
                   custom_generate=hs.generate)
    assert torch.equal(pg, hf) and spies["topk_warp"] == 8 and not hs.is_enabled()
    with pytest.raises(ValueError, match="num_beams"):
        generate(tiny_model, 9, 8, do_sample=False, num_beams=2, custom_generate=hs.generate)


# --- GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_kept_set_equals_hf_at_qwen_vocab(monkeypatch):
    """CUDA kernels at vocab 151,936 with bf16-rounded logits (large tie groups in the tail, where the top-p boundary
    falls). HF's float32 cumulative sum over the vocabulary decides its boundary to within rounding, so against HF's
    chain on the GPU (with a stable sort, as CUDA's sort of a long row is) the kept sets may differ only at the
    boundary, by a rounding-size mass; the top-k part and every kept value are exact."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(16, 151936, device="cuda", generator=g) * 2.5).bfloat16().float()
    for config in [(None, 50, 0.9, None), (None, None, 0.9, None), (0.7, None, 0.95, 0.05), (None, 50, None, None)]:
        out = hs.warp_logits(x, *config)
        with monkeypatch.context() as m:
            stable_sort(m)
            ref = hf_chain(*config)(None, x.clone())
        ko, kr = torch.isfinite(out), torch.isfinite(ref)
        both = ko & kr
        assert torch.equal(out[both], ref[both]), config
        p = torch.where(ko | kr, out.double(), float("-inf")).softmax(-1)
        assert float((p * (ko ^ kr)).sum(-1).max()) < 1e-4, config          # float32 cumsum of 151,936 terms
        for r in range(x.shape[0]):
            differ = (ko[r] ^ kr[r]).nonzero().flatten()
            assert x[r, differ].unique().numel() <= 2, (config, r)          # at the boundary only
        if config[2] is None:                                              # no top-p: exact
            assert torch.equal(ko, kr), config


@pytest.mark.gpu
def test_gpu_warper_in_a_cuda_graph_and_compiled():
    """Captured in a CUDA graph (a host sync would fail the capture) and replayed on new logits, and compiled with
    CUDA graphs (reduce-overhead, fullgraph): both equal the eager call."""
    warper = hs.PagodaLogitsWarper(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02)
    static = torch.randn(32, 151936, device="cuda") * 3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            warper(None, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = warper(None, static)
    fresh = torch.randn(32, 151936, device="cuda") * 3
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, warper(None, fresh))
    torch._dynamo.reset()
    compiled = torch.compile(lambda s: warper(None, s), fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        got = compiled(fresh)
    assert torch.equal(got, warper(None, fresh))


@pytest.mark.gpu
def test_gpu_generate_same_tokens_as_hf(tiny_model):
    model = tiny_model.to("cuda")
    try:
        ids = torch.randint(2, model.config.vocab_size, (4, 7), device="cuda")
        runs = []
        for on in (False, True):
            with hs.sampling(on):
                torch.manual_seed(11)
                runs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                           pad_token_id=0, do_sample=True, top_k=50, top_p=0.9))
        assert torch.equal(runs[0], runs[1])
    finally:
        model.to("cpu")

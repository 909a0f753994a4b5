"""pagoda.ops.sampling on the GPU only: no host synchronisation and CUDA-graph capture, large vocabularies
exact against the reference, and unlikely tokens keeping their mass."""
import math

import pytest
import torch

import pagoda.sampling as S
from pagoda.reference import sampling as ref
from tests.ops.sampling_laws import N, _gen, _k_first_keep, _many, _rows, assert_law


def _without_sync(*calls) -> None:
    """Run ``calls`` with CUDA's sync debug mode set to error: any host synchronisation raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _captured(call):
    """``(graph, output)``: ``call`` warmed up on a side stream (compiles outside the capture), then captured."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph_capture():
    p = _rows(5000, n_rows=8, device="cuda", temp=2.0)
    seed = torch.tensor([11], dtype=torch.int64, device="cuda")
    offset = torch.tensor([0], dtype=torch.int64, device="cuda")
    top_p = torch.full((8,), 0.9, device="cuda")
    eager = S.top_p_sampling_from_probs(p, top_p, seed=seed, offset=offset)
    _without_sync(lambda: S.top_p_sampling_from_probs(p, 0.9, generator=_gen("cuda")),
                  lambda: S.top_k_top_p_sampling_from_logits(p.log(), 50, 0.9, generator=_gen("cuda")),
                  lambda: S.min_p_sampling_from_probs(p, 0.1, seed=seed, offset=offset))
    graph, captured = _captured(lambda: S.top_p_sampling_from_probs(p, top_p, seed=seed, offset=offset))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    refused = None  # a generator's state would be frozen into the graph: refused, inside the capture
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        try:
            S.top_p_sampling_from_probs(p, top_p)
        except ValueError as exc:
            refused = exc
    assert refused is not None and "seed= and offset=" in str(refused)
    offset.fill_(1 << 20)
    graph.replay()
    assert not torch.equal(captured, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_vocab_filters_exact(dtype):
    vocab = 151936
    p = _rows(vocab, n_rows=4, device="cuda", temp=4.0).to(dtype)
    n = 4096
    idx = torch.arange(n, device="cuda") % 4
    p64 = p.double().cpu()
    for name, call, keep in (
            ("top_p", lambda: S.top_p_sampling_from_probs(p, 0.9, indices=idx, generator=_gen("cuda")),
             ref.keep_top_p(p64, torch.full((4,), 0.9, dtype=torch.float64))),
            ("top_k", lambda: S.top_k_sampling_from_probs(p, 50, indices=idx, generator=_gen("cuda")),
             ref.keep_top_k(p64, torch.full((4,), 50))),
            ("min_p", lambda: S.min_p_sampling_from_probs(p, 0.05, indices=idx, generator=_gen("cuda")),
             ref.keep_min_p(p64, torch.full((4,), 0.05, dtype=torch.float64)))):
        out = call().cpu().long()
        assert keep[idx.cpu(), out].all(), name
    r = S.top_p_renorm_probs(p.float(), 0.9)
    want = ref.top_p_renorm_probs(p.float().cpu(), 0.9)
    assert (r.cpu() > 0).ne(want > 0).sum() <= 4  # at most a boundary token per row from fp32 vs fp64 sums


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_vocab_top_k_top_p_exact(dtype):
    """Both filter orders on 151,936-token rows: every draw is in the reference's kept set, with top_k
    50 (settled by the tracked values), 1000 and 20000 (the k-th value fallback pass) and 0 (off), ties
    at the boundary (bf16 rows tie a lot), and the law on one row."""
    vocab, rows = 151936, 8
    p = torch.softmax(torch.randn(rows, vocab, device="cuda") * 3.0, -1).to(dtype)
    p[5, 1000:3000] = p[5].max()  # a huge tie at the top
    k_rows = torch.tensor([50, 1000, 20000, 0, 50, 60, 1, 3000], dtype=torch.int32)
    p_rows = torch.tensor([0.9, 0.9, 0.95, 0.9, 0.5, 0.99, 0.9, 0.3])
    n = 8192
    idx = torch.arange(n, device="cuda") % rows
    p64 = p.double().cpu()
    for order in ("top_k_first", "joint"):
        if order == "top_k_first":
            keep = _k_first_keep(p64, k_rows, p_rows.double())
        else:
            keep = ref.keep_top_k(p64, k_rows) & ref.keep_top_p(p64, p_rows.double())
        for seed in range(3):
            out = S.top_k_top_p_sampling_from_probs(p, k_rows.cuda()[idx], p_rows.cuda()[idx], indices=idx,
                                                    filter_apply_order=order, generator=_gen("cuda", seed))
            out = out.cpu().long()
            assert ((out >= 0) & (out < vocab)).all()
            assert keep[idx.cpu(), out].all(), (order, seed, keep[idx.cpu(), out].logical_not().nonzero()[:5])
        out = S.top_k_top_p_sampling_from_probs(p[:1], 50, 0.9, indices=_many("cuda", 20000),
                                                filter_apply_order=order, generator=_gen("cuda"))
        assert_law(out, torch.where(keep[0], p64[0], 0.0))


@pytest.mark.gpu
def test_gpu_top_k_top_p_graph_safe():
    """Both orders: no host synchronisation (sync debug mode errors), no allocation-size dependence on
    the data, and a captured CUDA graph replays the eager tokens; a new offset changes them."""
    vocab, rows = 151936, 16
    p = torch.softmax(torch.randn(rows, vocab, device="cuda") * 3.0, -1)
    seed = torch.tensor([7], dtype=torch.int64, device="cuda")
    offset = torch.tensor([0], dtype=torch.int64, device="cuda")
    top_k = torch.tensor([50, 2000] * (rows // 2), dtype=torch.int32, device="cuda")
    top_p = torch.full((rows,), 0.9, device="cuda")
    for order in ("top_k_first", "joint"):
        def seeded(order=order):
            return S.top_k_top_p_sampling_from_probs(p, top_k, top_p, filter_apply_order=order, seed=seed,
                                                     offset=offset)

        eager = seeded()
        _without_sync(seeded,
                      lambda o=order: S.top_k_top_p_sampling_from_probs(p, 50, 0.9, filter_apply_order=o,
                                                                        generator=_gen("cuda")),
                      lambda o=order: S.top_k_top_p_sampling_from_logits(p.log(), 50, 0.9, filter_apply_order=o,
                                                                         generator=_gen("cuda")))
        graph, captured = _captured(seeded)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager), order
        offset.fill_(1 << 20)
        graph.replay()
        torch.cuda.synchronize()
        assert not torch.equal(captured, eager), order
        offset.fill_(0)


def test_pagoda_sampling_module_mirrors_ops():
    from pagoda.ops import sampling as ops

    assert sorted(S.__all__) == sorted(ops.__all__)
    assert all(getattr(S, name) is getattr(ops, name) for name in ops.__all__)


@pytest.mark.gpu
def test_gpu_unlikely_tokens_keep_their_mass():
    # 20,000 tokens of p = 5e-7 (1% together) beside one of 0.99: the race must not under-sample
    # tokens whose winning exponential is ~1e-7 (a float near 1 cannot resolve that).
    vocab, n = 20001, 50000
    p = torch.full((1, vocab), 0.01 / (vocab - 1), device="cuda")
    p[0, 0] = 0.99
    for sampler in (lambda: S.sampling_from_probs(p, indices=_many("cuda", n), generator=_gen("cuda")),
                    lambda: S.top_p_sampling_from_probs(p, 1.0, indices=_many("cuda", n), generator=_gen("cuda")),
                    lambda: S.sampling_from_logits(p.log(), indices=_many("cuda", n), generator=_gen("cuda"))):
        tail = (sampler() != 0).sum().item()
        assert abs(tail - 0.01 * n) < 5 * math.sqrt(0.01 * 0.99 * n), tail


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_temperature_sampling_from_logits_law(dtype):
    """`temperature_sampling_from_logits` (pagoda's, the engine's plain-temperature path): the law of
    ``softmax(logits / t)`` per output, outputs mapped to rows; a scalar temperature too."""
    from pagoda.ops.sampling import temperature_sampling_from_logits

    logits = (torch.randn(2, 300, device="cuda") * 2).to(dtype)
    n = N
    rows = torch.arange(n, device="cuda") % 2
    t = torch.where(rows == 0, 0.5, 2.0).float()
    out = temperature_sampling_from_logits(logits, t, indices=rows, generator=_gen("cuda"))
    assert out.dtype == torch.int64
    for r, temp in ((0, 0.5), (1, 2.0)):
        assert_law(out[r::2], torch.softmax(logits[r].double().cpu() / temp, -1))
    one = temperature_sampling_from_logits(logits[:1], 1.5, indices=_many("cuda"), generator=_gen("cuda"))
    assert_law(one, torch.softmax(logits[0].double().cpu() / 1.5, -1))

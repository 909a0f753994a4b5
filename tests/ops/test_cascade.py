"""MultiLevelCascadeAttentionWrapper and build_cascade_levels: equal to plain paged attention over the
concatenated KV, for 2 and 3 levels, prefix of 0 / 1 / many pages, unique parts of 0 and many tokens."""
import os

import pytest
import torch

from pagoda import _switches
from pagoda.ops.cascade import MultiLevelCascadeAttentionWrapper
from pagoda.ops.cascade_levels import build_cascade_levels
from pagoda.reference.prefill import batch_prefill_with_paged_kv_cache
from tests.helpers import rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _scenario(page_size, prefix_pages, unique_tokens, qo_lens, hq, hk, d, layout, dtype, device, group_pages=0,
              seed=0):
    """Random cache whose requests share ``prefix_pages`` pages (and adjacent pairs ``group_pages`` more)."""
    g = torch.Generator().manual_seed(seed)
    n = len(unique_tokens)
    pool = torch.randperm(4096, generator=g).tolist()
    take = lambda k: [pool.pop() for _ in range(k)]  # noqa: E731
    prefix = take(prefix_pages)
    pair_prefix = [take(group_pages) for _ in range((n + 1) // 2)]
    page_lists, last = [], []
    for r, u in enumerate(unique_tokens):
        own = take(-(-u // page_size))
        page_lists.append(prefix + pair_prefix[r // 2] + own)
        last.append((u - 1) % page_size + 1 if own else (page_size if prefix or group_pages else 0))
    max_page = max([p for lst in page_lists for p in lst], default=0) + 1
    shape = (max_page, 2, page_size, hk, d) if layout == "NHD" else (max_page, 2, hk, page_size, d)
    cache = torch.randn(shape, generator=g).to(dtype).to(device)
    q = torch.randn(sum(qo_lens), hq, d, generator=g).to(dtype).to(device)
    return cache, q, page_lists, last


def _plain(q, cache, page_lists, last, qo_lens, layout):
    qo = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    kv = torch.tensor([0] + torch.tensor([len(p) for p in page_lists]).cumsum(0).tolist(), dtype=torch.int32)
    idx = torch.tensor([p for lst in page_lists for p in lst], dtype=torch.int32)
    out, _ = batch_prefill_with_paged_kv_cache(q.cpu().float(), cache.cpu().float(), qo, kv, idx,
                                               torch.tensor(last, dtype=torch.int32), layout, causal=True,
                                               sm_scale=q.shape[-1] ** -0.5)
    return out


def _cascade(q, cache, page_lists, last, qo_lens, page_size, num_levels, layout):
    levels = build_cascade_levels(page_lists, last, qo_lens, page_size, num_levels=num_levels, device=q.device)
    w = MultiLevelCascadeAttentionWrapper(num_levels, torch.empty(1 << 20, dtype=torch.uint8, device=q.device),
                                          kv_layout=layout)
    w.plan(*levels.as_plan_args(), q.shape[1], cache.shape[-2] if layout == "NHD" else cache.shape[2],
           q.shape[-1], page_size, causal=True, q_data_type=q.dtype, kv_data_type=cache.dtype)
    return w.run(q, cache), levels


CASES = [  # page_size, prefix pages, unique tokens per request, qo_lens
    (16, 4, [20, 0, 33, 1], [1, 1, 1, 1]),          # decode, an empty unique part
    (16, 1, [5, 40, 16], [3, 7, 2]),                 # prefill/append chunks
    (16, 0, [9, 17], [1, 1]),                        # no shared prefix at all
    (1, 37, [4, 0, 9], [1, 1, 4]),                   # page size 1
]


@pytest.mark.parametrize("page_size,prefix,unique,qo_lens", CASES)
@pytest.mark.parametrize("num_levels", [2, 3])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_cascade_equals_plain_paged_attention_cpu(page_size, prefix, unique, qo_lens, num_levels, layout):
    unique = [max(u, q) for u, q in zip(unique, qo_lens)] if prefix == 0 else unique
    cache, q, pages, last = _scenario(page_size, prefix, unique, qo_lens, 8, 2, 32, layout, torch.float32, "cpu",
                                      group_pages=2 if num_levels == 3 else 0)
    out, levels = _cascade(q, cache, pages, last, qo_lens, page_size, num_levels, layout)
    # With 3 levels adjacent pairs share 2 more pages; a batch of one pair shares them at level 0.
    pair_pages = 2 if num_levels == 3 else 0
    assert levels.shared_pages[0] == prefix + (pair_pages if len(unique) <= 2 else 0)
    if num_levels == 3 and len(unique) > 2:
        assert levels.shared_pages[1] == 2          # the first pair shares its 2 group pages
    assert rel_err(out, _plain(q, cache, pages, last, qo_lens, layout)) < 1e-5


def test_build_levels_never_shares_a_partial_page():
    # Two requests whose whole KV is the same 2 pages, the second one only half full: nothing beyond
    # the first page may be shared (the half page would be written by each request separately).
    lv = build_cascade_levels([[3, 4], [3, 4]], [8, 8], [1, 1], page_size=16)
    assert lv.shared_pages == [1]
    assert lv.paged_kv_indices_arr[0].tolist() == [3]
    assert lv.paged_kv_indices_arr[1].tolist() == [4, 4]
    assert lv.paged_kv_last_page_len_arr[1].tolist() == [8, 8]
    with pytest.raises(ValueError, match="last_page_lens"):
        build_cascade_levels([[1]], [0], [1], page_size=16)
    with pytest.raises(ValueError, match="num_levels"):
        build_cascade_levels([[1]], [1], [1], page_size=16, num_levels=4)


def test_plan_validation():
    w = MultiLevelCascadeAttentionWrapper(2, torch.empty(16, dtype=torch.uint8))
    lv = build_cascade_levels([[0, 1], [0, 2]], [16, 3], [1, 1], page_size=16)
    qo, kvp, kvi, last = lv.as_plan_args()
    with pytest.raises(ValueError, match="qo_indptr_arr must be a list of 2"):
        w.plan(qo[:1], kvp, kvi, last, 4, 2, 32, 16)
    bad = [qo[0], torch.tensor([0, 1, 3], dtype=torch.int32)]
    with pytest.raises(ValueError, match="same number of queries"):
        w.plan(bad, kvp, kvi, last, 4, 2, 32, 16)
    with pytest.raises(ValueError, match="num_levels"):
        MultiLevelCascadeAttentionWrapper(0, torch.empty(16, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,prefix,unique,qo_lens", CASES)
@pytest.mark.parametrize("num_levels", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cascade_gpu(page_size, prefix, unique, qo_lens, num_levels, dtype):
    unique = [max(u, q) for u, q in zip(unique, qo_lens)] if prefix == 0 else unique
    cache, q, pages, last = _scenario(page_size, prefix, unique, qo_lens, 32, 8, 128, "NHD", dtype, "cuda",
                                      group_pages=2 if num_levels == 3 else 0)
    out, _ = _cascade(q, cache, pages, last, qo_lens, page_size, num_levels, "NHD")
    assert not out.isnan().any()
    assert rel_err(out.cpu(), _plain(q, cache, pages, last, qo_lens, "NHD")) < 1.5e-2


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (TRITON_INTERPRET=1, no CUDA)")
@pytest.mark.parametrize("page_size,prefix,unique,qo_lens", CASES[:2] + CASES[3:])
def test_cascade_kernel_path_in_interpreter(monkeypatch, page_size, prefix, unique, qo_lens):
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    cache, q, pages, last = _scenario(page_size, prefix, unique, qo_lens, 4, 2, 32, "NHD", torch.float32, "cpu")
    out, _ = _cascade(q, cache, pages, last, qo_lens, page_size, 2, "NHD")
    assert rel_err(out, _plain(q, cache, pages, last, qo_lens, "NHD")) < 1e-4


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (TRITON_INTERPRET=1, no CUDA)")
@pytest.mark.parametrize("page_size,prefix,unique,qo_lens,hq,hk", [
    (16, 20, [20, 0, 33, 1], [1, 1, 1, 1], 8, 2),    # decode under a 320-key prefix, GQA 4
    (5, 60, [5, 40, 16], [3, 7, 2], 8, 1),           # append chunks, odd page size, GQA 8
])
def test_cascade_split_kv_shared_level_in_interpreter(monkeypatch, page_size, prefix, unique, qo_lens, hq, hk):
    """A long shared level with few queries is split over the keys (as on a GPU with many SMs)."""
    from pagoda.ops import _decode_plan, _prefill_split

    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: 64)
    monkeypatch.setattr(_prefill_split, "MIN_CHUNK_SMALL", 128)
    monkeypatch.setattr(_prefill_split, "MIN_CHUNK", 128)
    cache, q, pages, last = _scenario(page_size, prefix, unique, qo_lens, hq, hk, 16, "NHD", torch.float32, "cpu")
    levels = build_cascade_levels(pages, last, qo_lens, page_size, num_levels=2)
    w = MultiLevelCascadeAttentionWrapper(2, torch.empty(1 << 20, dtype=torch.uint8))
    w.plan(*levels.as_plan_args(), hq, hk, 16, page_size, causal=True, q_data_type=q.dtype)
    assert w._wrappers[0]._splits >= 2
    assert rel_err(w.run(q, cache), _plain(q, cache, pages, last, qo_lens, "NHD")) < 1e-5

"""Paged KV cache ops: CSR helpers, get_batch_indices_positions, append (CPU path, validation, GPU kernel)."""
import pytest
import torch

import pagoda.ops.page as page_ops
from pagoda.reference import page as ref
from tests.paged_utils import empty_cache, fill_cache, random_page_table

# ------------------------------------------------------------------------------------------- metadata


def test_get_batch_indices_positions_flashinfer_example():
    indptr = torch.tensor([0, 1, 3, 6, 10], dtype=torch.int32)
    seq_lens = torch.tensor([5, 5, 5, 5], dtype=torch.int32)
    b, p = page_ops.get_batch_indices_positions(indptr, seq_lens, 10)
    assert b.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert p.tolist() == [4, 3, 4, 2, 3, 4, 1, 2, 3, 4]
    assert b.dtype == p.dtype == torch.int32


def test_get_batch_indices_positions_empty_requests_padding_and_out_buffers():
    indptr = torch.tensor([0, 0, 2, 2, 3], dtype=torch.int32)
    seq_lens = torch.tensor([7, 9, 0, 1], dtype=torch.int32)
    bi = torch.full((5,), 99, dtype=torch.int32)
    po = torch.full((5,), 99, dtype=torch.int32)
    b, p = page_ops.get_batch_indices_positions(indptr, seq_lens, 5, bi, po)
    assert b is bi and p is po
    assert b.tolist() == [1, 1, 3, -1, -1]
    assert p.tolist() == [7, 8, 0, -1, -1]


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_block_table_csr_round_trip(page_size):
    lens = [0, 1, page_size, page_size + 1, 5 * page_size - 1]
    indptr, indices, last, _ = random_page_table(lens, page_size)
    table, seq = page_ops.csr_to_block_table(indptr, indices, last, page_size, max_blocks=7, pad_value=-1)
    assert seq.tolist() == lens and table.shape == (5, 7)
    for b in range(5):
        n = int(indptr[b + 1] - indptr[b])
        assert table[b, :n].tolist() == indices[indptr[b]:indptr[b + 1]].tolist()
        assert (table[b, n:] == -1).all()
    i2, x2, l2 = page_ops.block_table_to_csr(table, seq, page_size)
    assert torch.equal(i2, indptr) and torch.equal(x2, indices) and torch.equal(l2, last)
    assert page_ops.get_seq_lens(indptr, last, page_size).tolist() == lens


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 5, 16, 64])
@pytest.mark.parametrize("tuple_form", [False, True])
def test_append_prefill_then_decode_matches_contiguous(layout, page_size, tuple_form):
    heads, dim = 2, 16
    old = [0, 1, 40, 0, 70]
    new = [3, 1, 1, 0, 9]
    lens = [a + b for a, b in zip(old, new)]
    indptr, indices, last, max_pages = random_page_table(lens, page_size)
    cache = empty_cache(max_pages, page_size, heads, dim, layout, torch.float32, tuple_form=tuple_form)
    keys = [torch.randn(n, heads, dim) for n in lens]
    vals = [torch.randn(n, heads, dim) for n in lens]
    # The old part via the test-side filler, the new tokens through the op under test.
    fill_cache(cache, [k[:o] for k, o in zip(keys, old)], [v[:o] for v, o in zip(vals, old)], indptr, indices,
               page_size, layout)
    app_ptr = torch.zeros(len(new) + 1, dtype=torch.int32)
    app_ptr[1:] = torch.cumsum(torch.tensor(new), 0)
    ak = torch.cat([k[o:] for k, o in zip(keys, old)])
    av = torch.cat([v[o:] for v, o in zip(vals, old)])
    b, p = page_ops.get_batch_indices_positions(app_ptr, torch.tensor(lens, dtype=torch.int32), ak.shape[0])
    page_ops.append_paged_kv_cache(ak, av, b, p, cache, indices, indptr, last, kv_layout=layout)
    got = ref.gather_paged_kv(cache, indptr, indices, last, layout)
    for (k, v), ek, ev in zip(got, keys, vals):
        assert torch.equal(k, ek) and torch.equal(v, ev)


def test_append_skips_padding_entries():
    indptr, indices, last, max_pages = random_page_table([4], 2)
    cache = torch.zeros(max_pages, 2, 2, 1, 8)
    ak, av = torch.ones(3, 1, 8), torch.ones(3, 1, 8)
    b = torch.tensor([0, -1, -1], dtype=torch.int32)
    p = torch.tensor([3, -1, -1], dtype=torch.int32)
    page_ops.append_paged_kv_cache(ak, av, b, p, cache, indices, indptr, last)
    assert cache.sum().item() == 16  # one token of K and one of V, 8 dims each


# ------------------------------------------------------------------------------------------- validation

def _setup(layout="NHD"):
    indptr, indices, last, max_pages = random_page_table([5, 3], 4)
    cache = torch.zeros(max_pages, 2, 4, 2, 8) if layout == "NHD" else torch.zeros(max_pages, 2, 2, 4, 8)
    k = torch.randn(2, 2, 8)
    b = torch.tensor([0, 1], dtype=torch.int32)
    p = torch.tensor([4, 2], dtype=torch.int32)
    return dict(append_key=k, append_value=k.clone(), batch_indices=b, positions=p, paged_kv_cache=cache,
                kv_indices=indices, kv_indptr=indptr, kv_last_page_len=last, kv_layout=layout)


@pytest.mark.parametrize("change,err,match", [
    (dict(kv_layout="NDH"), ValueError, "kv_layout"),
    (dict(append_key=torch.randn(2, 3, 8)), ValueError, "append_key"),
    (dict(append_value=torch.randn(2, 2, 8, dtype=torch.float16)), TypeError, "append_value"),
    (dict(positions=torch.tensor([4, 3], dtype=torch.int32)), ValueError, "positions"),
    (dict(positions=torch.tensor([4, 2], dtype=torch.int64)), TypeError, "positions"),
    (dict(batch_indices=torch.tensor([0, 2], dtype=torch.int32)), ValueError, "batch_indices"),
    (dict(kv_indptr=torch.tensor([0, 3, 2], dtype=torch.int32)), ValueError, "kv_indptr"),
    (dict(kv_indptr=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError, "kv_indptr"),
    (dict(kv_indptr=torch.tensor([0, 2, 9], dtype=torch.int32)), ValueError, "kv_indptr"),
    (dict(kv_indices=torch.tensor([0, 1, 500], dtype=torch.int32)), ValueError, "kv_indices"),
    (dict(kv_last_page_len=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "kv_last_page_len"),
    (dict(kv_last_page_len=torch.tensor([5, 3], dtype=torch.int32)), ValueError, "kv_last_page_len"),
    (dict(kv_last_page_len=torch.tensor([1], dtype=torch.int32)), ValueError, "kv_last_page_len"),
    (dict(paged_kv_cache=torch.zeros(5, 3, 4, 2, 8)), ValueError, "paged_kv_cache"),
    (dict(paged_kv_cache=torch.zeros(5, 2, 4, 2, 8, dtype=torch.int32)), TypeError, "paged_kv_cache"),
    (dict(paged_kv_cache=[torch.zeros(5, 4, 2, 8)]), TypeError, "paged_kv_cache"),
])
def test_append_validation_names_the_argument(change, err, match):
    args = _setup()
    args.update(change)
    with pytest.raises(err, match=match):
        page_ops.append_paged_kv_cache(**args)


def test_empty_request_must_have_zero_last_page_len():
    indptr = torch.tensor([0, 0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv_last_page_len\[0\].*must be 0"):
        page_ops.csr_to_block_table(indptr, torch.tensor([0], dtype=torch.int32),
                                    torch.tensor([2, 1], dtype=torch.int32), 4)


def test_metadata_validation():
    with pytest.raises(ValueError, match="nnz"):
        page_ops.get_batch_indices_positions(torch.tensor([0, 3], dtype=torch.int32),
                                             torch.tensor([3], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="seq_lens"):
        page_ops.get_batch_indices_positions(torch.tensor([0, 3], dtype=torch.int32),
                                             torch.tensor([2], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="block_table"):
        page_ops.block_table_to_csr(torch.zeros(1, 2, dtype=torch.int32), torch.tensor([9], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="page_size"):
        page_ops.get_seq_lens(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32), 0)


# ------------------------------------------------------------------------------------------- GPU kernel

@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 7, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,dim", [(8, 128), (1, 64), (4, 256)])
def test_append_cuda_matches_reference(layout, page_size, dtype, heads, dim):
    lens = [0, 1, 300, 17, 64]
    new = [0, 1, 37, 17, 1]
    indptr, indices, last, max_pages = random_page_table(lens, page_size, device="cuda")
    cache = torch.randn(*empty_cache(max_pages, page_size, heads, dim, layout, dtype).shape, dtype=dtype,
                        device="cuda")
    expect = cache.clone()
    app_ptr = torch.zeros(len(new) + 1, dtype=torch.int32, device="cuda")
    app_ptr[1:] = torch.cumsum(torch.tensor(new, device="cuda"), 0)
    nnz = sum(new)
    ak = torch.randn(nnz, heads, dim, dtype=dtype, device="cuda")
    av = torch.randn(nnz, heads, dim, dtype=dtype, device="cuda")
    b, p = page_ops.get_batch_indices_positions(app_ptr, torch.tensor(lens, dtype=torch.int32, device="cuda"),
                                                nnz + 4)
    page_ops.append_paged_kv_cache(ak, av, b, p, cache, indices, indptr, last, kv_layout=layout)
    ref.append_paged_kv_cache(ak, av, b[:nnz], p[:nnz], expect, indices, indptr, last, kv_layout=layout)
    assert torch.equal(cache, expect)


# ------------------------------------------------------------------------------------------- fused RoPE + append

def _fused_case(device="cpu", dtype=torch.float32, layout="NHD", page_size=4):
    lens = [6, 1, 13]  # 2, 1 and 13 of those tokens are appended
    indptr, indices, last, max_pages = random_page_table(lens, page_size, device=device)
    cache = torch.zeros(*empty_cache(max_pages, page_size, 2, 32, layout, dtype).shape, dtype=dtype, device=device)
    app_ptr = torch.tensor([0, 2, 3, 16], dtype=torch.int32, device=device)
    b, p = page_ops.get_batch_indices_positions(app_ptr, torch.tensor(lens, dtype=torch.int32, device=device), 16)
    ak = torch.randn(16, 2, 32, dtype=dtype, device=device)
    av = torch.randn(16, 2, 32, dtype=dtype, device=device)
    q = torch.randn(16, 4, 32, dtype=dtype, device=device)
    return ak, av, b, p, cache, indices, indptr, last, q


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 16])
@pytest.mark.parametrize("llama31", [False, True])
def test_fused_rope_append_equals_rope_then_append(interleave, rotary_dim, llama31):
    from pagoda.ops import rope

    ak, av, b, p, cache, indices, indptr, last, q = _fused_case()
    expect, q_expect = cache.clone(), q.clone()
    kw = dict(rotary_dim=rotary_dim, interleave=interleave, rope_scale=8.0 if llama31 else 2.0, rope_theta=5e5)
    fn = rope.apply_llama31_rope_pos_ids if llama31 else rope.apply_rope_pos_ids
    q_rot, k_rot = fn(q_expect, ak, p, **kw)
    page_ops.append_paged_kv_cache(k_rot, av, b, p, expect, indices, indptr, last)
    ak_before = ak.clone()
    page_ops.append_paged_kv_cache_with_rope(ak, av, b, p, cache, indices, indptr, last, q=q, llama31=llama31, **kw)
    assert torch.equal(ak, ak_before)
    torch.testing.assert_close(cache, expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(q, q_rot, rtol=0, atol=1e-6)


def test_fused_rope_append_validation():
    ak, av, b, p, cache, indices, indptr, last, q = _fused_case()
    with pytest.raises(ValueError, match="rotary_dim"):
        page_ops.append_paged_kv_cache_with_rope(ak, av, b, p, cache, indices, indptr, last, rotary_dim=7)
    with pytest.raises(ValueError, match="q must be"):
        page_ops.append_paged_kv_cache_with_rope(ak, av, b, p, cache, indices, indptr, last, q=q[:3])
    with pytest.raises(ValueError, match="rope_theta"):
        page_ops.append_paged_kv_cache_with_rope(ak, av, b, p, cache, indices, indptr, last, rope_theta=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_rope_append_cuda(layout, interleave, dtype):
    ak, av, b, p, cache, indices, indptr, last, q = _fused_case("cuda", dtype, layout, page_size=16)
    expect = cache.clone()
    k_rot = ref_rope(ak.cpu(), p.cpu(), interleave)
    ref.append_paged_kv_cache(k_rot.cuda(), av, b, p, expect, indices, indptr, last, kv_layout=layout)
    q_rot = ref_rope(q.cpu(), p.cpu(), interleave)
    page_ops.append_paged_kv_cache_with_rope(ak, av, b, p, cache, indices, indptr, last, kv_layout=layout, q=q,
                                             interleave=interleave)
    torch.testing.assert_close(cache.float(), expect.float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(q.cpu().float(), q_rot.float(), rtol=0, atol=2e-2)


def ref_rope(x, pos, interleave):
    from pagoda.reference import rope as rope_ref

    return rope_ref.rope_ref(x, pos, rope_ref.rope_frequencies(x.shape[-1], 1.0, 1e4), interleave)

"""Bad inputs to the paged-KV wrappers and page helpers: clear TypeError/ValueError naming the argument."""
import pytest
import torch

import pagoda


def i32(*a):
    return torch.tensor(a, dtype=torch.int32)


WS = torch.empty(1 << 20, dtype=torch.uint8)
CACHE = torch.randn(4, 2, 4, 2, 16)


def _decode(**kw):
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(WS)
    args = dict(indptr=i32(0, 2, 3), indices=i32(0, 1, 2), last_page_len=i32(3, 4), num_qo_heads=4, num_kv_heads=2,
                head_dim=16, page_size=4, q_data_type=torch.float32)
    args.update(kw)
    w.plan(**args)
    return w


def _prefill(**kw):
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(WS)
    args = dict(qo_indptr=i32(0, 3, 4), paged_kv_indptr=i32(0, 2, 3), paged_kv_indices=i32(0, 1, 2),
                paged_kv_last_page_len=i32(3, 4), num_qo_heads=4, num_kv_heads=2, head_dim_qk=16, page_size=4,
                q_data_type=torch.float32)
    args.update(kw)
    w.plan(**args)
    return w


def _ragged():
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(WS)
    w.plan(i32(0, 3, 4), i32(0, 5, 9), 4, 2, 16, q_data_type=torch.float32)
    return w


@pytest.mark.parametrize("bad", [[0, 2, 3], None])
def test_decode_plan_indptr_not_tensor(bad):
    with pytest.raises(TypeError, match="indptr"):
        _decode(indptr=bad)


def test_prefill_plan_negative_page_id():
    with pytest.raises(ValueError, match="paged_kv_indices"):
        _prefill(paged_kv_indices=i32(0, -1, 2))


@pytest.mark.parametrize("name,value", [("q_scale", 0.0), ("q_scale", float("nan")), ("k_scale", -1.0),
                                        ("v_scale", float("nan")), ("v_scale", "x")])
def test_run_scales_checked(name, value):
    with pytest.raises(ValueError, match=name):
        _decode().run(torch.randn(2, 4, 16), CACHE, **{name: value})
    with pytest.raises(ValueError, match=name):
        _prefill().run(torch.randn(4, 4, 16), CACHE, **{name: value})
    k = torch.randn(9, 2, 16)
    with pytest.raises(ValueError, match=name):
        _ragged().run(torch.randn(4, 4, 16), k, k, **{name: value})


def test_decode_run_bad_v_scale_leaves_out_untouched():
    out = torch.full((2, 4, 16), 7.0)
    with pytest.raises(ValueError, match="v_scale"):
        _decode().run(torch.randn(2, 4, 16), CACHE, out=out, v_scale=float("nan"))
    assert (out == 7.0).all()


def test_run_scales_still_apply():
    q = torch.randn(2, 4, 16)
    w = _decode()
    ref = w.run(q, CACHE)
    torch.testing.assert_close(w.run(q, CACHE, v_scale=2.0), 2 * ref)
    torch.testing.assert_close(w.run(q, CACHE, q_scale=0.5, k_scale=2.0), ref)


@pytest.mark.parametrize("name", ["out", "lse"])
def test_prefill_run_out_lse_not_tensor(name):
    with pytest.raises(TypeError, match=name):
        _prefill().run(torch.randn(4, 4, 16), CACHE, **{name: [1.0]})


def test_csr_to_block_table_checks():
    with pytest.raises(TypeError, match="kv_indptr"):
        pagoda.csr_to_block_table([0, 2, 3], i32(0, 1, 2), i32(3, 4), 4)
    with pytest.raises(ValueError, match="kv_indices"):
        pagoda.csr_to_block_table(i32(0, 2, 3), i32(0, -1, 2), i32(3, 4), 4)
    with pytest.raises(ValueError, match="pad_value"):
        pagoda.csr_to_block_table(i32(0, 2, 3), i32(0, 1, 2), i32(3, 4), 4, pad_value=2 ** 40)


def test_block_table_to_csr_checks():
    with pytest.raises(TypeError, match="page_size"):
        pagoda.block_table_to_csr(i32(0, 2).view(1, 2), i32(5), True)
    with pytest.raises(ValueError, match="block_table"):
        pagoda.block_table_to_csr(i32(-1, 2).view(1, 2), i32(5), 4)
    # Padding past the used columns may hold anything.
    _, indices, _ = pagoda.block_table_to_csr(i32(0, -1, 2, 3).view(2, 2), i32(3, 5), 4)
    assert indices.tolist() == [0, 2, 3]


def test_get_batch_indices_positions_nnz():
    with pytest.raises(TypeError, match="nnz"):
        pagoda.get_batch_indices_positions(i32(0, 1, 3), i32(5, 5), True)
    with pytest.raises(ValueError, match="nnz"):
        pagoda.get_batch_indices_positions(i32(0, 1, 3), i32(5, 5), 10 ** 13)


def test_append_with_rope_llama31_bool():
    cache = torch.zeros(4, 2, 4, 2, 16)
    with pytest.raises(TypeError, match="llama31"):
        pagoda.append_paged_kv_cache_with_rope(torch.randn(3, 2, 16), torch.randn(3, 2, 16), i32(0, 0, 1), i32(5, 6, 3),
                                               cache, i32(0, 1, 2), i32(0, 2, 3), i32(3, 4), llama31="yes")
    assert not cache.any()

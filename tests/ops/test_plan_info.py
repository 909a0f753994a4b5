"""``_plan_info`` of the FlashInfer-style wrappers (FlashInfer's tests check ``wrapper._plan_info is not None``
after `plan`): None before the first plan, pagoda's plan state after it (the device tables the kernels read, as
planned), replaced by the next plan; on the CPU path, also in FlashInfer's workspace_size -> reset -> plan order."""
import torch

import pagoda
from tests.paged_utils import random_page_table

HQ, HK, D, PS = 4, 2, 32, 4


def _ws(n=1 << 20):
    return torch.empty(n, dtype=torch.uint8)


def _csr(lens):
    indptr, indices, last, _ = random_page_table(lens, PS)
    return indptr, indices, last


def _same_tables(info, tables):
    assert len(info) >= len(tables)
    for got, want in zip(info, tables, strict=False):
        assert torch.equal(got.cpu(), want.cpu())


def test_decode_plan_info(path):
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws())
    assert w._plan_info is None
    first = _csr([5, 9, 1])
    w.plan(*first, HQ, HK, D, PS, q_data_type=torch.float32)
    info = w._plan_info
    assert info is not None
    _same_tables(info, first)
    assert isinstance(info[3], int) and info[3] >= 0          # the planned split-KV count
    second = _csr([17, 2])
    w.plan(*second, HQ, HK, D, PS, q_data_type=torch.float32)
    assert w._plan_info is not info
    _same_tables(w._plan_info, second)
    # A swapped workspace voids the plan here (run raises until the next plan).
    w.reset_workspace_buffer(_ws(), _ws(1024))
    assert w._plan_info is None


def test_decode_plan_info_workspace_size_order():
    # FlashInfer's order: size the buffers, swap them in, plan.
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws())
    csr = _csr([40, 33, 7, 64])
    f, i = w.workspace_size(*csr, HQ, HK, D, PS, q_data_type=torch.float32, kv_data_type=torch.float32)
    w.reset_workspace_buffer(_ws(max(f, 16)), _ws(i))
    assert w._plan_info is None
    w.plan(*csr, HQ, HK, D, PS, q_data_type=torch.float32, kv_data_type=torch.float32)
    assert w._plan_info is not None


def test_decode_multi_token_plan_info():
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws(), use_tensor_cores=True)
    w.plan(*_csr([6, 8]), HQ, HK, D, PS, q_data_type=torch.float32, q_len_per_req=2)
    assert w._plan_info is not None and w._plan_info is w._multi


def test_cuda_graph_decode_plan_info():
    bufs = (torch.zeros(4, dtype=torch.int32), torch.zeros(32, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    for w in (pagoda.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(_ws(), *bufs),
              pagoda.BatchDecodeWithPagedKVCacheWrapper(_ws(), use_cuda_graph=True, paged_kv_indptr_buffer=bufs[0],
                                                       paged_kv_indices_buffer=bufs[1],
                                                       paged_kv_last_page_len_buffer=bufs[2])):
        assert w._plan_info is None
        csr = _csr([5, 3])
        w.plan(*csr, HQ, HK, D, PS, q_data_type=torch.float32)
        info = w._plan_info
        assert info is not None and info[0] is bufs[0]          # the graph's own buffers, holding the plan
        assert torch.equal(info[0][:3], csr[0]) and torch.equal(info[2][:2], csr[2])


def test_prefill_paged_plan_info(path):
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(_ws())
    assert w._plan_info is None
    qo = torch.tensor([0, 3, 4], dtype=torch.int32)
    csr = _csr([6, 9])
    w.plan(qo, *csr, HQ, HK, D, PS, causal=True, q_data_type=torch.float32)
    info = w._plan_info
    assert info is not None
    _same_tables(info, (qo, *csr))
    qo2, csr2 = torch.tensor([0, 2], dtype=torch.int32), _csr([11])
    w.plan(qo2, *csr2, HQ, HK, D, PS, q_data_type=torch.float32, fixed_split_size=1)
    assert w._plan_info is not info
    _same_tables(w._plan_info, (qo2, *csr2))


def test_prefill_paged_cuda_graph_plan_info():
    bufs = (torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), torch.zeros(16, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32))
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(_ws(), use_cuda_graph=True, qo_indptr_buf=bufs[0],
                                                   paged_kv_indptr_buf=bufs[1], paged_kv_indices_buf=bufs[2],
                                                   paged_kv_last_page_len_buf=bufs[3])
    assert w._plan_info is None
    qo, csr = torch.tensor([0, 2, 5], dtype=torch.int32), _csr([4, 7])
    w.plan(qo, *csr, HQ, HK, D, PS, q_data_type=torch.float32)
    assert w._plan_info is not None and w._plan_info[0] is bufs[0]
    _same_tables(w._plan_info, (qo, csr[0]))


def test_prefill_ragged_plan_info(path):
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(_ws())
    assert w._plan_info is None
    qo, kv = torch.tensor([0, 3, 4], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)
    w.plan(qo, kv, HQ, HK, D, causal=True, q_data_type=torch.float32)
    info = w._plan_info
    assert info is not None
    _same_tables(info, (qo, kv))
    qo2, kv2 = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 9], dtype=torch.int32)
    w.plan(qo2, kv2, HQ, HK, D, q_data_type=torch.float32)
    assert w._plan_info is not info
    _same_tables(w._plan_info, (qo2, kv2))

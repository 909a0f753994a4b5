"""Ops on tensors of a CUDA device that is not the current one run on the tensors' device.

Needs two GPUs: with ``cuda:0`` current, every call gets ``cuda:1`` tensors and must give the result it
gives on ``cuda:0`` (the launches go through `pagoda.kernels.launch.fast`'s device guard; the Gluon attention
kernel through `device_of`), leave ``cuda:0`` current and write nothing on ``cuda:0``.
"""
import pytest
import torch

import pagoda
from pagoda.ops import sampling
from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper
from tests.helpers import rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA devices")]


def _on(dev, *ts):
    return [t.to(dev) for t in ts]


def _both(fn, *tensors):
    """fn on cuda:0 tensors and on cuda:1 tensors, with cuda:0 current both times."""
    torch.cuda.set_device(0)
    a = fn(*_on("cuda:0", *tensors))
    b = fn(*_on("cuda:1", *tensors))
    assert torch.cuda.current_device() == 0
    return a, b


@pytest.mark.parametrize("d, s", [(128, 300), (64, 2048)])  # Gluon kernel on sm_90 / the Triton kernel
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_on_another_device(d, s, causal):
    q, k, v = (torch.randn(2, s, 4, d, dtype=torch.bfloat16) for _ in range(3))
    a, b = _both(lambda q, k, v: pagoda.flash_attn_func(q, k, v, causal=causal), q, k, v)
    assert b.device == torch.device("cuda:1")
    assert rel_err(b.cpu().float(), a.cpu().float()) < 1e-6


def test_batch_decode_on_another_device():
    hq, hk, d, ps, pages = 8, 2, 128, 16, 40
    cache = torch.randn(pages, 2, ps, hk, d, dtype=torch.bfloat16)
    indptr = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
    indices = torch.randperm(pages)[:20].int()
    last = torch.tensor([5, 0, 16], dtype=torch.int32)
    q = torch.randn(3, hq, d, dtype=torch.bfloat16)

    def run(q, cache, indptr, indices, last):
        w = BatchDecodeWithPagedKVCacheWrapper(torch.empty(8 << 20, dtype=torch.uint8, device=q.device), "NHD")
        w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        return [w.run(q, cache) for _ in range(3)][-1]     # the last run replays recorded launches
    a, b = _both(run, q, cache, indptr, indices, last)
    assert b.device == torch.device("cuda:1")
    assert rel_err(b.cpu().float(), a.cpu().float()) < 1e-6


def test_sampling_on_another_device():
    probs = torch.softmax(torch.randn(16, 5000) * 3, -1)
    seed, offset = 1234, 0
    a, b = _both(lambda p: sampling.top_k_top_p_sampling_from_probs(p, 50, 0.9, seed=seed, offset=offset), probs)
    assert b.device == torch.device("cuda:1")
    assert torch.equal(a.cpu(), b.cpu())

"""The cached-launch fast path on the GPU: repeated decode launches stay exact when the tensors'
alignment changes between calls (a new specialisation must go through the normal path)."""
import pytest
import torch

from pagoda.kernels import _launch
from pagoda.ops.decode import BatchDecodeWithPagedKVCacheWrapper
from pagoda.reference import decode as ref
from tests.helpers import rel_err
from tests.paged_utils import empty_cache, fill_cache, random_page_table

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_repeated_and_misaligned_launches_match_reference():
    lens, ps, hq, hk, d = [700, 1, 0, 2049], 16, 8, 2, 64
    indptr, indices, last, max_pages = random_page_table(lens, ps, device="cuda")
    cache = empty_cache(max_pages, ps, hk, d, "NHD", torch.bfloat16, device="cuda")
    keys = [torch.randn(n, hk, d, dtype=torch.bfloat16, device="cuda") for n in lens]
    vals = [torch.randn(n, hk, d, dtype=torch.bfloat16, device="cuda") for n in lens]
    fill_cache(cache, keys, vals, indptr.cpu(), indices.cpu(), ps, "NHD")
    w = BatchDecodeWithPagedKVCacheWrapper(torch.empty(16 << 20, dtype=torch.uint8, device="cuda"), "NHD")
    w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    buf = torch.randn(len(lens) * hq * d + 1, dtype=torch.bfloat16, device="cuda")
    aligned = buf[:-1].view(len(lens), hq, d)
    misaligned = buf[1:].view(len(lens), hq, d)               # data_ptr % 16 == 2
    for q in (aligned, aligned, misaligned, misaligned, aligned):
        out, lse = w.run(q, cache, return_lse=True)
        o_ref, l_ref = ref.batch_decode_with_paged_kv_cache(q.float(), cache.float(), indptr, indices, last, "NHD")
        assert rel_err(out.float(), o_ref) < 2e-2
        assert torch.equal(torch.isinf(lse), torch.isinf(l_ref))
    if _launch._ENABLED:
        assert any(key[0] is not None for key in _launch._compiled)   # the fast path's cache was filled

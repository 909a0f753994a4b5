"""The Triton append kernel under TRITON_INTERPRET=1 on the CPU, against the reference."""
import os

import pytest
import torch

from pagoda.ops import _paged
from pagoda.reference import page as ref
from tests.paged_utils import empty_cache, random_page_table

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="interpreter tests run only where TRITON_INTERPRET=1 (no CUDA)")

triton = pytest.importorskip("triton")
from pagoda.kernels.page import append_paged_kv  # noqa: E402


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("tuple_form", [False, True])
@pytest.mark.parametrize("heads,dim", [(2, 16), (3, 40)])
def test_append_kernel_matches_reference(layout, page_size, tuple_form, heads, dim):
    lens = [0, 1, 20, 9]
    new = [0, 1, 6, 9]
    indptr, indices, last, max_pages = random_page_table(lens, page_size)
    cache = empty_cache(max_pages, page_size, heads, dim, layout, torch.float16, tuple_form=tuple_form)
    expect = tuple(c.clone() for c in cache) if tuple_form else cache.clone()
    app_ptr = torch.zeros(len(new) + 1, dtype=torch.int32)
    app_ptr[1:] = torch.cumsum(torch.tensor(new), 0)
    nnz = sum(new)
    ak = torch.randn(nnz, heads, dim, dtype=torch.float16)
    av = torch.randn(nnz, heads, dim, dtype=torch.float16)
    b, p = ref.get_batch_indices_positions(app_ptr, torch.tensor(lens, dtype=torch.int32), nnz + 2)
    k_cache, v_cache = ref.unpack_paged_kv_cache(cache, layout)
    append_paged_kv(ak, av, b, p, k_cache, v_cache, indices, indptr, _paged.cache_strides(k_cache, layout),
                    _paged.cache_strides(v_cache, layout), page_size)
    ref.append_paged_kv_cache(ak, av, b[:nnz], p[:nnz], expect, indices, indptr, last, kv_layout=layout)
    got = torch.stack(cache) if tuple_form else cache
    want = torch.stack(expect) if tuple_form else expect
    # NaN-poisoned slots that nobody writes must stay NaN in both; written ones must be equal.
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    assert (~want.isnan()).sum() == 2 * nnz * heads * dim

"""The cached-launch fast path on the GPU: repeated decode launches stay exact when the tensors'
alignment changes between calls (a new specialisation must go through the normal path)."""
import pytest
import torch

from pagoda.kernels.launch import fast as _launch
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
    if _launch.enabled():
        assert _launch._compiled                                     # the fast path's cache was filled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_every_autotuned_paged_prefill_config_matches_reference(block_m):
    """Each (BLOCK_N, warps, stages) the autotuner may pick, compiled for this GPU, split and not."""
    from pagoda.kernels.attention.prefill_paged import _TILES, SPLIT_ALIGN, prefill_paged_fwd
    from pagoda.ops import _paged
    from pagoda.reference import prefill as pref

    kv, qo, ps, hq, hk, d = [0, 1, 700, 300, 2049], [0, 1, 40, 7, 5], 16, 8, 2, 128
    indptr, indices, last, max_pages = random_page_table(kv, ps, device="cuda")
    cache = empty_cache(max_pages, ps, hk, d, "NHD", torch.bfloat16, device="cuda")
    fill_cache(cache, [torch.randn(n, hk, d, dtype=torch.bfloat16, device="cuda") for n in kv],
               [torch.randn(n, hk, d, dtype=torch.bfloat16, device="cuda") for n in kv],
               indptr.cpu(), indices.cpu(), ps, "NHD")
    qptr = torch.tensor([0] + torch.tensor(qo).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(qo), hq, d, dtype=torch.bfloat16, device="cuda")
    want, _ = pref.batch_prefill_with_paged_kv_cache(q.float(), cache.float().nan_to_num(), qptr, indptr, indices,
                                                     last, "NHD", causal=True, sm_scale=d ** -0.5)
    kc, vc = cache[:, 0], cache[:, 1]
    for bn, warps, stages in _TILES[block_m]:
        for splits in (0, -(-max(kv) // SPLIT_ALIGN)):
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[0], hq, device="cuda")
            split = {}
            if splits:
                split = dict(num_splits=splits, chunk=torch.tensor([SPLIT_ALIGN], dtype=torch.int32, device="cuda"),
                             o_part=torch.empty(q.shape[0], splits, hq, d, device="cuda"),
                             lse_part=torch.empty(q.shape[0], splits, hq, device="cuda"))
            prefill_paged_fwd(q, kc, vc, _paged.cache_strides(kc, "NHD"), _paged.cache_strides(vc, "NHD"), qptr,
                              indptr, indices, last, ps, hk, max(qo), out, lse, sm_scale=d ** -0.5, causal=True,
                              config={"BLOCK_M": block_m, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages},
                              **split)
            assert rel_err(out.float(), want) < 2e-2, (bn, warps, stages, splits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autotuned_attention_through_launch_tuned(monkeypatch):
    """With autotuning on, the first call tunes and later calls launch the chosen config directly
    (`launch_tuned`); results stay exact, also when the tensors' alignment changes."""
    import pagoda
    from pagoda.reference import attention as ref_attn

    monkeypatch.setenv("PAGODA_AUTOTUNE", "1")
    b, s, h, d = 2, 300, 4, 64
    buf = torch.randn(3 * b * s * h * d + 8, dtype=torch.float16, device="cuda")
    for offset in (0, 0, 3, 0):          # 3 halves: misaligned bases (no TMA, new specialisation), then back
        q, k, v = (buf[offset + i * b * s * h * d: offset + (i + 1) * b * s * h * d].view(b, s, h, d)
                   for i in range(3))
        out = pagoda.flash_attn_func(q, k, v, causal=True)
        want = ref_attn.flash_attn_func(q.float(), k.float(), v.float(), causal=True)
        assert rel_err(out.float(), want) < 1e-2

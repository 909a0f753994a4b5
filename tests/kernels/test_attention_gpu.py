"""Every launch configuration of the attention kernel on the GPU (TMA and pointer loads), bf16/fp16."""
import pytest
import torch

from pagoda.reference.attention import flash_attn_varlen_func as ref_varlen
from tests.helpers import assert_finite_lse_close, rel_err

pytestmark = pytest.mark.gpu


def _configs():
    from pagoda.kernels.attention.fwd import _TILES
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, USE_TMA=tma) for bm, bn, w, st, tma in _TILES]


@pytest.mark.parametrize("cfg", _configs(),
                         ids=lambda c: "{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}tma{USE_TMA}".format(**c))
@pytest.mark.parametrize("d", [80, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_config_varlen(cfg, d, causal, dtype):
    from pagoda.kernels.attention.fwd import attention_fwd, tma_supported

    lens_q = [0, 1, 130, 257, 64, 1]
    lens_k = [3, 1, 130, 300, 0, 513]
    dev = "cuda"
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q = torch.randn(sum(lens_q), 8, d, device=dev, dtype=dtype)
    k = torch.randn(sum(lens_k), 2, d, device=dev, dtype=dtype)
    v = torch.randn(sum(lens_k), 2, d, device=dev, dtype=dtype)
    if cfg["USE_TMA"] and not tma_supported(k, v):
        pytest.skip("no tensor descriptors on this GPU")
    out = torch.full_like(q, float("nan"))
    lse = torch.full((8, q.shape[0]), float("nan"), device=dev)
    attention_fwd(q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                  batch_size=len(lens_q), softmax_scale=d ** -0.5, window_left=-1,
                  window_right=0 if causal else -1, softcap=0.0, alibi_slopes=None, config=cfg)
    r, rl, _ = ref_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_attn_probs=True)
    assert not out.isnan().any()
    assert rel_err(out, r) < (1.2e-2 if dtype == torch.bfloat16 else 2e-3)
    assert_finite_lse_close(lse, rl, atol=2e-2)

"""The Triton attention kernel under TRITON_INTERPRET=1 on the CPU (fp16/fp32; bf16 is checked on GPU)."""
import os

import pytest
import torch

from pagoda.reference.attention import flash_attn_func as ref_dense
from pagoda.reference.attention import flash_attn_varlen_func as ref_varlen
from tests.helpers import assert_finite_lse_close, rel_err

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="interpreter tests run only where TRITON_INTERPRET=1 (no CUDA)")

triton = pytest.importorskip("triton")
from pagoda.kernels.attention.fwd import attention_fwd  # noqa: E402

CFG = {"BLOCK_M": 16, "BLOCK_N": 16}


def _run_dense(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None, config=CFG):
    b, sq, hq, d = q.shape
    left, right = window[0], (0 if causal else window[1])
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq, sq), float("nan"))
    attention_fwd(q, k, v, out, lse, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=sq, batch_size=b,
                  softmax_scale=d ** -0.5, window_left=left, window_right=right, softcap=softcap,
                  alibi_slopes=alibi, config=config)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 7), (17, 40), (40, 17), (33, 33), (16, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_matches_reference(dtype, sq, sk, causal):
    q = torch.randn(2, sq, 4, 32, dtype=dtype)
    k = torch.randn(2, sk, 2, 32, dtype=dtype)
    v = torch.randn(2, sk, 2, 32, dtype=dtype)
    out, lse = _run_dense(q, k, v, causal=causal)
    ref, ref_lse, _ = ref_dense(q, k, v, causal=causal, return_attn_probs=True)
    assert not out.isnan().any(), "output element left unwritten"
    assert rel_err(out, ref) < (2e-3 if dtype == torch.float16 else 1e-5)
    assert_finite_lse_close(lse, ref_lse, atol=1e-3)


@pytest.mark.parametrize("head_dim", [40, 80])
def test_padded_head_dim(head_dim):
    q = torch.randn(1, 19, 2, head_dim, dtype=torch.float16)
    k = torch.randn(1, 23, 1, head_dim, dtype=torch.float16)
    v = torch.randn(1, 23, 1, head_dim, dtype=torch.float16)
    out, _ = _run_dense(q, k, v, causal=True)
    assert rel_err(out, ref_dense(q, k, v, causal=True)) < 2e-3


@pytest.mark.parametrize("window", [(5, 3), (0, 0), (8, -1), (-1, 2)])
def test_sliding_window(window):
    q = torch.randn(1, 37, 2, 32)
    k = torch.randn(1, 45, 2, 32)
    v = torch.randn(1, 45, 2, 32)
    out, lse = _run_dense(q, k, v, window=window)
    ref, ref_lse, _ = ref_dense(q, k, v, window_size=window, return_attn_probs=True)
    assert rel_err(out, ref) < 1e-5
    assert_finite_lse_close(lse, ref_lse, atol=1e-4)


def test_softcap_and_alibi():
    q = torch.randn(2, 21, 4, 32) * 3
    k = torch.randn(2, 30, 4, 32) * 3
    v = torch.randn(2, 30, 4, 32)
    slopes = torch.rand(2, 4)
    out, lse = _run_dense(q, k, v, causal=True, softcap=5.0, alibi=slopes)
    ref, ref_lse, _ = ref_dense(q, k, v, causal=True, softcap=5.0, alibi_slopes=slopes, return_attn_probs=True)
    assert rel_err(out, ref) < 1e-5
    assert_finite_lse_close(lse, ref_lse, atol=1e-4)


def test_causal_rows_without_keys_are_zero():
    # seqlen_q > seqlen_k with a bottom-right causal mask: the first sq - sk rows see nothing.
    q = torch.randn(1, 20, 2, 32)
    k = torch.randn(1, 6, 2, 32)
    v = torch.randn(1, 6, 2, 32)
    out, lse = _run_dense(q, k, v, causal=True)
    assert torch.equal(out[0, :14], torch.zeros_like(out[0, :14]))
    assert torch.isneginf(lse[0, :, :14]).all()
    assert rel_err(out, ref_dense(q, k, v, causal=True)) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_with_empty_and_single_sequences(causal):
    lens_q = [5, 0, 1, 23, 9]
    lens_k = [5, 3, 1, 30, 0]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), 4, 32, dtype=torch.float16)
    k = torch.randn(int(cu_k[-1]), 1, 32, dtype=torch.float16)
    v = torch.randn(int(cu_k[-1]), 1, 32, dtype=torch.float16)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((4, q.shape[0]), float("nan"))
    attention_fwd(q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                  batch_size=len(lens_q), softmax_scale=32 ** -0.5, window_left=-1,
                  window_right=0 if causal else -1, softcap=0.0, alibi_slopes=None, config=CFG)
    ref, ref_lse, _ = ref_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                 return_attn_probs=True)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 2e-3
    assert_finite_lse_close(lse, ref_lse, atol=1e-3)


def test_custom_op_runs_the_kernel_and_compiles_as_one_opaque_call():
    # pagoda::attention_fwd is what the CUDA path calls; torch.compile must keep it whole (HF static
    # cache compiles the forward). Here the op runs the kernel in the interpreter on CPU tensors.
    from pagoda.ops._attention_op import attention_fwd_op

    q, k, v = torch.randn(1, 20, 2, 32), torch.randn(1, 20, 2, 32), torch.randn(1, 20, 2, 32)

    def f(q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(1, 2, 20)
        attention_fwd_op(q, k, v, out, lse, None, None, None, 20, 1, 32 ** -0.5, -1, 0, 0.0)
        return out * 1.0, lse

    ref, ref_lse, _ = ref_dense(q, k, v, causal=True, return_attn_probs=True)
    out, lse = f(q, k, v)
    assert rel_err(out, ref) < 1e-5
    out_c, lse_c = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    assert rel_err(out_c, ref) < 1e-5
    assert_finite_lse_close(lse_c, ref_lse, atol=1e-4)

"""The Triton RoPE kernel under TRITON_INTERPRET=1 on the CPU, against the reference (fp16/fp32)."""
import os

import pytest
import torch

from pagoda.reference import rope as ref
from tests.helpers import rel_err

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="interpreter tests run only where TRITON_INTERPRET=1 (no CUDA)")

triton = pytest.importorskip("triton")
from pagoda.kernels.rope import rope_fwd  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("d,rotary_dim", [(64, 64), (64, 32), (40, 24)])
@pytest.mark.parametrize("llama31", [False, True])
def test_rope_kernel_matches_reference(dtype, interleave, d, rotary_dim, llama31):
    x = torch.randn(13, 3, d, dtype=dtype)
    pos = torch.randint(0, 4000, (13,), dtype=torch.int32)
    freqs = ref.rope_frequencies(rotary_dim, 8.0 if llama31 else 1.0, 5e5 if llama31 else 1e4, llama31)
    want = ref.rope_ref(x, pos, freqs, interleave, torch.float64)
    out = torch.full_like(x, float("nan"))
    rope_fwd(x, out, pos, freqs.float(), interleave)
    assert not out.isnan().any()
    assert rel_err(out, want) < (2e-3 if dtype == torch.float16 else 1e-4)  # fp32 angles
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    inplace = x.clone()
    rope_fwd(inplace, inplace, pos, freqs.float(), interleave)
    assert torch.equal(inplace, out)

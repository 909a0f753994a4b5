"""The layer kernels (`pagoda.kernels.layers`: RMSNorm, gated activations) under TRITON_INTERPRET=1 on the CPU,
called directly: packed rows, the chunked long-row path, two-level row strides, column tiles; fp16/fp32 against
the float64 reference, outputs poisoned with NaN first so every element must be written (and nothing else)."""
import os

import pytest
import torch

from pagoda.ops import _rows
from pagoda.reference import activation as ref_act
from pagoda.reference import norm as ref_norm
from tests.helpers import rel_err

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="interpreter tests run only where TRITON_INTERPRET=1 (no CUDA)")

triton = pytest.importorskip("triton")
from pagoda.kernels.layers import activation as kact  # noqa: E402
from pagoda.kernels.layers import norm as knorm  # noqa: E402

TOL = {torch.float16: 2e-3, torch.float32: 2e-6}


def _layout(x, out, residual=None):
    tensors = (x, out) if residual is None else (x, out, residual)
    n_rows, inner, strides = _rows.layout(tensors)
    assert None not in strides
    return (n_rows, inner, x.shape[-1], strides[0], strides[1], strides[2] if residual is not None else (0, 0))


def test_configs():
    assert knorm._config(1, 4096)[:3] == (1, 4096, True)
    assert knorm._config(97, 64)[:3] == (64, 64, True)            # short rows packed 64 to a program
    assert knorm._config(3, 64)[:3] == (4, 64, True)              # ... but no more than the rows there are
    assert knorm._config(5, 896)[1] == 1024
    assert knorm._config(2, 20000)[:3] == (1, knorm.CHUNK, False)  # past MAX_TILE: chunks
    for rows, hidden in ((1, 64), (4096, 1024), (7, 8192), (1, 16384)):
        block_r, block_h, _, warps = knorm._config(rows, hidden)
        assert block_h >= hidden and block_r * block_h <= max(knorm.TILE_ELEMS, block_h) and warps in (4, 8, 16)
    assert kact._config(1, 14336)[:2] == (1, 512)                 # a decode row spread over 28 programs
    assert kact._config(4096, 14336)[:2] == (2, 2048)
    assert kact._config(97, 64)[:2] == (64, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("rows,hidden", [(97, 64), (5, 96), (3, 1000)])
def test_rmsnorm_packed_and_odd_rows(dtype, gemma, rows, hidden):
    """Packed rows with a partial last block: every output row written, the rows past the end untouched."""
    x = (torch.randn(rows, hidden) * 2).to(dtype)
    w = torch.randn(hidden).to(dtype)
    buf = torch.full((rows + 3, hidden), float("nan"), dtype=dtype)
    out = buf[:rows]
    knorm.rmsnorm_fwd(x, w, out, 1e-6, gemma, _layout(x, out))
    assert not out.isnan().any() and buf[rows:].isnan().all()
    assert rel_err(out, ref_norm.rmsnorm_ref(x, w, 1e-6, gemma, torch.float64)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
def test_chunked_long_rows(monkeypatch, dtype, fused):
    """Rows longer than MAX_TILE go in CHUNK pieces (shrunk here so the interpreter stays fast), a partial last
    piece included; the fused form in place, reading back the residual it stored."""
    monkeypatch.setattr(knorm, "MAX_TILE", 256)
    monkeypatch.setattr(knorm, "CHUNK", 128)
    rows, hidden = 3, 1000
    x = (torch.randn(rows, hidden) * 2).to(dtype)
    w = torch.randn(hidden).to(dtype)
    if fused:
        r = torch.randn(rows, hidden).to(dtype)
        x0, r0 = x.clone(), r.clone()
        knorm.rmsnorm_fwd(x, w, x, 1e-5, False, _layout(x, x, r), residual=r)
        normed, total = ref_norm.fused_add_rmsnorm_ref(x0, r0, w, 1e-5)
        assert torch.equal(r, total)
        assert rel_err(x, ref_norm.rmsnorm_ref(total, w, 1e-5, False, torch.float64)) < TOL[dtype]
        if dtype == torch.float16:
            assert (x != normed).float().mean() < 0.01        # HF's rounding points
    else:
        out = torch.full_like(x, float("nan"))
        knorm.rmsnorm_fwd(x, w, out, 1e-5, True, _layout(x, out))
        assert not out.isnan().any()
        assert rel_err(out, ref_norm.rmsnorm_ref(x, w, 1e-5, True, torch.float64)) < TOL[dtype]


def test_two_level_row_strides():
    """Rows of a [tokens, heads, head_dim] view (row r at (r // heads) * s0 + (r % heads) * s1), fused with a
    residual of another layout, written in place; nothing outside the views changes."""
    tokens, heads, hd = 5, 3, 64
    big_x = torch.randn(tokens, heads + 1, hd + 32).half()
    big_r = torch.randn(heads, tokens, hd).half()
    x = big_x[:, :heads, 16:16 + hd]                       # strides ((heads + 1) * 96, 96, 1)
    r = big_r.transpose(0, 1)                              # strides (hd, tokens * hd, 1)
    w = torch.randn(hd).half()
    bx0, x0, r0 = big_x.clone(), x.clone(), r.clone()
    layout = _layout(x, x, r)
    assert layout[1] == heads
    knorm.rmsnorm_fwd(x, w, x, 1e-6, False, layout, residual=r)
    normed, total = ref_norm.fused_add_rmsnorm_ref(x0, r0, w, 1e-6)
    assert torch.equal(r, total)
    assert rel_err(x, ref_norm.rmsnorm_ref(total, w, 1e-6, False, torch.float64)) < TOL[torch.float16]
    mask = torch.ones_like(big_x, dtype=torch.bool)
    mask[:, :heads, 16:16 + hd] = False
    assert torch.equal(big_x[mask], bx0[mask])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("rows,d", [(1, 3000), (97, 64), (3, 100)])
def test_act_and_mul_tiles(dtype, name, rows, d):
    """Column tiles with a partial last one (d=3000 in 512-wide tiles), packed short rows, strided rows."""
    wide = (torch.randn(rows, 2 * d + 8) * 3).to(dtype)
    x = wide[:, 8:]                                       # row stride 2d + 8
    buf = torch.full((rows + 2, d + 4), float("nan"), dtype=dtype)
    out = buf[:rows, :d]                                  # row stride d + 4
    kact.act_and_mul_fwd(x, out, name, rows, d, x.stride(0), out.stride(0))
    assert not out.isnan().any()
    assert buf[rows:].isnan().all() and buf[:, d:].isnan().all()
    want = ref_act.act_and_mul_ref(x, name, torch.float64)
    g, u = x[:, :d].double(), x[:, d:].double()
    # float32's cancellation in g * cdf(g) for negative g, as PyTorch's own float32 GELU has it
    assert (out.double() - want).norm() <= TOL[dtype] * want.norm() + (g * u).norm() * 2.0**-21

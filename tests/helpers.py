"""Shared test helpers: relative error and NaN-poisoned outputs."""
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_finite_lse_close(lse: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    """LSE rows equal, treating -inf == -inf as equal (rows that see no key)."""
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "LSE -inf pattern differs"
    fin = torch.isfinite(ref)
    assert torch.isfinite(lse[fin]).all()
    if fin.any():
        torch.testing.assert_close(lse[fin].double(), ref[fin].double(), atol=atol, rtol=0)

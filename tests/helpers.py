"""Shared test helpers: relative error, LSE comparison, a stand-in kernel for the fast-launch path."""
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


def fake_fast_launch(monkeypatch, log: list, arg_names):
    """A stand-in Triton kernel for tests of `pagoda.kernels._launch` on the CPU, with the fast path forced on:
    ``kernel[grid](*args)`` appends ``("planned", args)`` to ``log`` and returns a compiled kernel whose
    launcher appends ``("replay", args)``. Returns the kernel."""
    import types

    from pagoda.kernels import _launch

    class Compiled:
        packed_metadata, function = "meta", "fn"

        @property
        def run(self):
            return lambda *a: log.append(("replay", a[9:]))

    class Kernel:
        params = [types.SimpleNamespace(name=n, has_default=False, default=None) for n in arg_names]

        def __getitem__(self, grid):
            return lambda *a, **kw: log.append(("planned", a)) or Compiled()

    Kernel.arg_names = list(arg_names)
    monkeypatch.setenv("PAGODA_TRITON_ON_CPU", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_launch, "_ENABLED", True)
    monkeypatch.setattr(_launch, "_compiled", {})
    monkeypatch.setattr(_launch, "_device_stream", (lambda: 0, lambda device: 7))
    return Kernel()

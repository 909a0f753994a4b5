"""Shared test helpers: relative error, LSE comparison, a stand-in kernel for the fast-launch path, the
ahead-of-time sm_90 compile scripts' runner."""
import os
import subprocess
import sys

import torch

from pagoda import _switches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """A stand-in Triton kernel for tests of `pagoda.kernels.launch.fast` on the CPU, with the fast path forced on:
    ``kernel[grid](*args)`` appends ``("planned", args)`` to ``log`` and returns a compiled kernel whose
    launcher appends ``("replay", args)``. Returns the kernel."""
    import types

    from pagoda.kernels.launch import fast as _launch

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
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_launch, "enabled", lambda: True)
    monkeypatch.setattr(_launch, "_compiled", {})
    monkeypatch.setattr(_launch, "_device_stream", (lambda: 0, lambda device: 7))
    return Kernel()


def run_aot_script(script: str) -> str:
    """Run an ahead-of-time compile script in a fresh interpreter (not under TRITON_INTERPRET, repo on the
    path). Skips when Triton has no Gluon (the script prints NO_GLUON) or bundles no ptxas; the script must
    print COMPILED. Returns its stdout."""
    import pytest
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if "NO_GLUON" in r.stdout:
        pytest.skip("this triton has no Gluon")
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("no ptxas bundled with this triton")
    print(r.stdout)
    assert r.returncode == 0 and "COMPILED" in r.stdout, r.stderr[-3000:]
    return r.stdout

"""Fixtures shared by the op tests."""
import pytest
import torch

from pagoda import _switches
from pagoda.ops import _paged


@pytest.fixture(params=["reference", "triton"])
def path(request, monkeypatch):
    """Which implementation the ops take on the CPU: the reference, or the Triton kernels in the interpreter
    (the `pagoda._switches.TRITON_ON_CPU` test hook)."""
    triton = request.param == "triton"
    if triton and not _switches.interpreting():
        pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", triton)
    assert _paged.use_triton(torch.empty(1)) == triton, "the ops' dispatch did not follow the test hook"
    return request.param

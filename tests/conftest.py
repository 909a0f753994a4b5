"""Test setup: without CUDA, Triton kernels run in the interpreter (must be set before triton.jit runs)."""
import os

import pytest
import torch

from pagoda import _switches

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """For one test, the ops send CPU tensors to the Triton kernels (run by the interpreter) instead of the
    reference; tests that switch mid-way set `pagoda._switches.TRITON_ON_CPU` with monkeypatch themselves."""
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (stable within a run for reproduction from the test id).
    torch.manual_seed(hash(request.node.nodeid) % (2**31))

# GPU tests use the fixed default launch config (autotuning every shape would take minutes);
# one test switches autotuning back on explicitly.
os.environ.setdefault("PAGODA_AUTOTUNE", "0")

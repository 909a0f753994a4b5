"""Test setup: without CUDA, Triton kernels run in the interpreter (must be set before triton.jit runs)."""
import os
import zlib

import pytest
import torch

from pagoda import _switches

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--print-failures-now", action="store_true",
                     help="print each failure's traceback when it happens, not only in the final summary (a run "
                          "cut by a time limit keeps them; benchmarks/gpu.sh uses it)")


def pytest_runtest_logreport(report):
    # Runs in the controller under xdist too (workers forward their reports).
    if report.failed and _print_failures_now:
        print(f"\n=== FAILURE {report.nodeid} ({report.when})\n{report.longreprtext}\n=== END", flush=True)


_print_failures_now = False


def pytest_configure(config):
    global _print_failures_now    # the --print-failures-now flag, read by the report hook; set once per session
    _print_failures_now = config.getoption("--print-failures-now")


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
    # A different seed per test, the same in every run (from the test id: str hashes vary between processes).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))

# GPU tests use the fixed default launch config (autotuning every shape would take minutes);
# one test switches autotuning back on explicitly.
os.environ.setdefault("PAGODA_AUTOTUNE", "0")

"""Shim: `flashinfer.utils` is pagoda (re-export only), plus the test-environment queries below.

The peer's tests import these from ``flashinfer.utils`` to decide what to build or skip; they are
facts about the machine, not attention API, so the harness answers them here (listed in the
conformance README):

- ``has_flashinfer_jit_cache()``: true. The tests' ``warmup_jit`` fixtures prebuild the peer's JIT
  modules when it is false; pagoda compiles its Triton kernels on first use, so there is nothing to build.
- ``get_compute_capability(device)``: the device's (major, minor), as torch reports it.
- ``GPUArchitectureError``: the exception type the peer's skip decorator catches (pagoda raises none).
"""
import torch
from _conformance_shim import install

install(__name__, globals())


def has_flashinfer_jit_cache() -> bool:
    return True


def get_compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


class GPUArchitectureError(Exception):
    pass

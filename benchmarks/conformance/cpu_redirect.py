"""``-p cpu_redirect``: run the peers' tests on a machine without CUDA, with every CUDA device they name read as
the CPU, so that pagoda's CPU path answers them. A check of semantics and signatures (argument checks, returned
shapes and dtypes, LSE bases, sampling rules), not of the kernels: the figures that count come from GPU runs.

What it changes, for the test process only: a ``TorchFunctionMode`` that rewrites ``device=`` arguments naming
CUDA (a string, a ``torch.device`` or an int) to ``"cpu"`` and makes ``Tensor.cuda()`` / ``.to("cuda")`` the
identity; ``torch.Generator("cuda")`` makes a CPU generator; ``torch.cuda.synchronize`` and ``empty_cache`` do
nothing; ``torch.cuda.is_available`` says True and the device capability is sm_90 (the tests' skip rules then
take an H100's branch). CUDA graphs and streams stay unavailable (those cases fail, and are read as such).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def _cpu(dev):
    if isinstance(dev, int) and not isinstance(dev, bool):
        return "cpu"
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    return dev


class _ToCPU(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "to" and args:
            rest = [_cpu(a) if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool) else a
                    for a in args[1:]]
            args = (args[0], *rest)
        return func(*args, **kwargs)


_Generator = torch.Generator


class _GeneratorType(type):
    def __call__(cls, device="cpu"):
        return _Generator(device=_cpu(device))

    def __instancecheck__(cls, obj):
        return isinstance(obj, _Generator)


class _CPUGenerator(metaclass=_GeneratorType):
    """``torch.Generator(device)`` with CUDA devices read as the CPU; ``isinstance(g, torch.Generator)`` still holds
    for every generator."""


def pytest_configure(config):
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.current_device = lambda: 0
    torch.Generator = _CPUGenerator
    torch.set_default_device(None)
    _ToCPU().__enter__()

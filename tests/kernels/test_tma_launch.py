"""`pagoda.kernels.launch.tma` on the CPU, with a stand-in kernel and C launcher: what a repeat launch passes
to Triton 3.6's C launcher (grid, stream, the launcher head, each descriptor expanded to its encoded map, shape
and strides, the runtime arguments, one object per constexpr), and when it falls back to ``kernel[grid]``.
The GPU tests (`test_attention_hopper_gpu.py::test_gluon_fast_launch_matches_normal_launch`) compare its
results with Triton's own launch bit for bit."""
import pytest
import torch

pytest.importorskip("triton")
from pagoda.kernels.launch import tma as T  # noqa: E402


class _Kernel:
    """``kernel[grid](...)`` recorder with the parameter names of a Gluon kernel (two descriptors, two runtime
    arguments, two constexprs and ``num_warps``)."""
    arg_names = ["a_desc", "b_desc", "X", "n", "BLOCK", "CAUSAL", "num_warps"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return "compiled"
        return run


def _descs(a, b):
    return ((a, [2, 8, 64], [512, 64, 1], (1, 4, 64), "layout-a"),
            (b, [2, 8, 64], [512, 64, 1], (1, 8, 64), "layout-b"))


def test_repeat_passes_the_c_launcher_layout(monkeypatch):
    kernel = _Kernel()
    launched = []
    fills = []
    a, b, x = torch.zeros(2, 8, 64), torch.zeros(2, 8, 64), torch.zeros(4)
    encodings = ((128, 2, 10, [1, 4, 64]), (64, 2, 10, [1, 8, 64]))
    head = ("function", False, False, None, None, "packed", None, None, None)
    entry = ("compiled", lambda *args: launched.append(args), head, encodings, (32, True, 4))
    monkeypatch.setitem(T._entries, ("key",), entry)
    monkeypatch.setattr(T, "_FILL", [lambda *args: fills.append(args) or f"map{len(fills)}"])
    monkeypatch.setattr(T, "_current", lambda: (lambda: 0, lambda device: 1234))
    monkeypatch.setattr(T, "_no_hooks", lambda: True)
    monkeypatch.delenv("PAGODA_GLUON_FAST_LAUNCH", raising=False)
    out = T.tma_launch(("key",), kernel, (3, 5), _descs(a, b), (x, 7), {"BLOCK": 32, "CAUSAL": True}, 4)
    assert out == "compiled" and not kernel.calls
    assert fills == [(a.data_ptr(), 128, 2, 10, [1, 4, 64], [2, 8, 64], [512, 64, 1], 0),
                     (b.data_ptr(), 64, 2, 10, [1, 8, 64], [2, 8, 64], [512, 64, 1], 0)]
    assert launched == [(3, 5, 1, 1234, *head, "map1", 2, 8, 64, 512, 64, 1, "map2", 2, 8, 64, 512, 64, 1, x, 7,
                         32, True, 4)]
    # PAGODA_GLUON_FAST_LAUNCH=0: Triton's own launch, with descriptors built from the same specs.
    monkeypatch.setenv("PAGODA_GLUON_FAST_LAUNCH", "0")
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    made = []
    monkeypatch.setattr("triton.experimental.gluon.nvidia.hopper.TensorDescriptor",
                        lambda *spec: made.append(spec) or f"desc{len(made)}")
    T.tma_launch(("key",), kernel, (3, 5), _descs(a, b), (x, 7), {"BLOCK": 32, "CAUSAL": True}, 4, maxnreg=128)
    assert len(launched) == 1
    assert made == [(a, [2, 8, 64], [512, 64, 1], [1, 4, 64], "layout-a"), (b, [2, 8, 64], [512, 64, 1], [1, 8, 64],
                                                                              "layout-b")]
    assert kernel.calls == [((3, 5), ("desc1", "desc2", x, 7), {"BLOCK": 32, "CAUSAL": True, "num_warps": 4,
                                                                  "maxnreg": 128})]


def test_first_launch_is_normal_and_keys_only_a_known_launcher(monkeypatch):
    """A key's first launch goes through ``kernel[grid]``; its result is kept only when the launcher is Triton
    3.6's (here a plain string: no entry), so the next launch is normal again."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    kernel = _Kernel()
    monkeypatch.setattr("triton.experimental.gluon.nvidia.hopper.TensorDescriptor", lambda *spec: "desc")
    monkeypatch.setattr(T, "_VERSION_OK", True)
    monkeypatch.setattr(T, "_FILL", ["fill"])
    monkeypatch.delenv("PAGODA_GLUON_FAST_LAUNCH", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = torch.zeros(2, 8, 64)
    for _ in range(2):
        T.tma_launch(("other key",), kernel, (1,), _descs(a, a), (a, 1), {"BLOCK": 8, "CAUSAL": False}, 4)
    assert len(kernel.calls) == 2 and ("other key",) not in T._entries
    assert T._resolve("compiled", 2) is None

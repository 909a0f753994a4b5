"""Python cost per call of the samplers' CUDA path (`pagoda.ops.sampling`), measured on a CPU machine.

    PYTHONPATH=$PWD python3 benchmarks/host_probe_sampling_cpu.py [--profile]

The inputs are CPU tensors of a subclass whose ``is_cuda`` is True, so every op takes its kernel
path: validation, per-row parameters, Philox seed/offset (explicit ints: no generator), output
allocation and the launch arguments. Two columns per batch: "stubbed" = the kernels' `launch`
replaced by a no-op; "fast" = the real `_launch.launch` fast path with each kernel replaced by a
stand-in of the same parameters whose compiled launcher does nothing (a repeat launch's Python
before the compiled launcher itself, which adds ~7 µs per kernel on the H200 host). b=1 uses vocab
151,936; b=128 uses vocab 32,768 (same launch configuration branch) so that the ``[batch, vocab]``
outputs of softmax/renorm stay below glibc's mmap threshold, as they would stay in the CUDA caching
allocator.

Not covered (CUDA-only, not callable here): per scalar top_k/top_p/min_p/temperature the CUDA path
reads the capture state and the current stream and looks up a cached constant row instead of the
``torch.full`` timed here; without seed/offset it reads and advances the CUDA generator.
"""
import os
import sys
import time
import types

os.environ.pop("TRITON_INTERPRET", None)  # plain JITFunctions: the stand-ins copy their parameters
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pagoda.kernels.launch import fast as _launch  # noqa: E402
from pagoda.kernels.sampling import row as ksampling  # noqa: E402
from pagoda.kernels.sampling import filters as kfilters  # noqa: E402
from pagoda.ops import sampling as S  # noqa: E402

VOCAB = {1: 151936, 128: 32768}


class _AsCuda(torch.Tensor):
    """A tensor that says it is on CUDA (the ops' only device test); torch functions run as usual."""
    __torch_function__ = torch._C._disabled_torch_function_impl
    is_cuda = True


class _Compiled:
    packed_metadata, function = "meta", "fn"
    run = staticmethod(lambda *a: None)


class _Standin:
    """Has the parameters of ``kernel``; ``[grid]`` (the normal, slow launch path: counted in ``slow``)
    returns a compiled kernel whose launcher does nothing."""

    def __init__(self, kernel):
        self.arg_names = list(kernel.arg_names)
        self.params = [types.SimpleNamespace(name=p.name, has_default=getattr(p, "has_default", False),
                                             default=getattr(p, "default", None), is_constexpr=p.is_constexpr)
                       for p in kernel.params]
        self.slow = 0

    def __getitem__(self, grid):
        self.slow += 1
        return lambda *a, **kw: _Compiled()


def _cases(batch):
    """(name, call) per sampler; explicit int seed/offset (the generator path needs CUDA)."""
    def as_cuda(t):
        return torch.Tensor._make_subclass(_AsCuda, t)

    p = as_cuda(torch.softmax(torch.randn(batch, VOCAB[batch]), -1))
    lg = as_cuda(torch.randn(batch, VOCAB[batch]))
    kw = dict(seed=1234, offset=0)
    return [
        ("sampling_from_probs", lambda: S.sampling_from_probs(p, **kw)),
        ("sampling_from_logits", lambda: S.sampling_from_logits(lg, **kw)),
        ("top_k_sampling_from_probs", lambda: S.top_k_sampling_from_probs(p, 50, **kw)),
        ("top_p_sampling_from_probs", lambda: S.top_p_sampling_from_probs(p, 0.9, **kw)),
        ("min_p_sampling_from_probs", lambda: S.min_p_sampling_from_probs(p, 0.1, **kw)),
        ("top_k_top_p_from_probs k_first", lambda: S.top_k_top_p_sampling_from_probs(p, 50, 0.9, **kw)),
        ("top_k_top_p_from_probs joint",
         lambda: S.top_k_top_p_sampling_from_probs(p, 50, 0.9, filter_apply_order="joint", **kw)),
        ("top_k_top_p_from_logits k_first", lambda: S.top_k_top_p_sampling_from_logits(lg, 50, 0.9, **kw)),
        ("top_k_top_p_from_logits joint",
         lambda: S.top_k_top_p_sampling_from_logits(lg, 50, 0.9, filter_apply_order="joint", **kw)),
        ("top_k_renorm_probs", lambda: S.top_k_renorm_probs(p, 50)),
        ("top_p_renorm_probs", lambda: S.top_p_renorm_probs(p, 0.9)),
        ("top_k_mask_logits", lambda: S.top_k_mask_logits(lg, 50)),
        ("softmax", lambda: S.softmax(lg)),
        ("softmax temperature=0.7", lambda: S.softmax(lg, temperature=0.7)),
    ]


def _time(fn, n=2000, repeats=5) -> float:
    """µs per call: the fastest of ``repeats`` loops of ``n`` calls."""
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def _stub_launches():
    ksampling.launch = kfilters.launch = lambda *a, **kw: None


def _fast_launches():
    ksampling.launch = kfilters.launch = _launch.launch
    _launch._ENABLED = True
    _launch._device_stream = (lambda: 0, lambda device: 7)
    for mod, name in ((ksampling, "_sample_kernel"), (kfilters, "_threshold_kernel"), (kfilters, "_softmax_kernel")):
        if not isinstance(getattr(mod, name), _Standin):
            setattr(mod, name, _Standin(getattr(mod, name)))


def _slow_launches_with_advancing_offset(n=1000) -> tuple[int, int]:
    """(slow-path launches, entries left in the fast path's cache) over ``n`` top_k_top_p calls whose int
    offset advances per call, as the generator path's does (the fast path keys runtime ints by Triton's
    specialisation class since 2026-12-01; by exact value before, when all 1000 took the slow path)."""
    _fast_launches()
    _launch._compiled.clear()
    kernel = ksampling._sample_kernel
    kernel.slow = 0
    p = torch.Tensor._make_subclass(_AsCuda, torch.softmax(torch.randn(1, VOCAB[1]), -1))
    for i in range(n):
        S.top_k_top_p_sampling_from_probs(p, 50, 0.9, seed=1234, offset=i * VOCAB[1])
    return kernel.slow, len(_launch._compiled)


def _profile(fn, n=20000):
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> None:
    rows = {}
    for batch in (1, 128):
        for name, fn in _cases(batch):
            _stub_launches()
            stubbed = _time(fn)
            _fast_launches()
            fast = _time(fn)
            rows[(name, batch)] = (stubbed, fast)
    print(f"{'sampler':34s} {'b=1 stubbed':>12s} {'b=1 fast':>9s} {'b=128 stubbed':>14s} {'b=128 fast':>11s}")
    for name, _ in _cases(1):
        (s1, f1), (s128, f128) = rows[(name, 1)], rows[(name, 128)]
        print(f"{name:34s} {s1:12.1f} {f1:9.1f} {s128:14.1f} {f128:11.1f}")
    slow, kept = _slow_launches_with_advancing_offset()
    print(f"\nint offset advancing per call (the generator path): {slow} of 1000 launches took the slow "
          f"path (kernel[grid]); the fast path's cache holds {kept} entries (cleared at 256)")
    if "--profile" in sys.argv:
        worst = max(rows, key=lambda k: rows[k][1])
        print(f"\ncProfile, fast launch: {worst[0]} b={worst[1]} (tottime, 20000 calls)")
        _fast_launches()
        _profile(dict(_cases(worst[1]))[worst[0]])


if __name__ == "__main__":
    main()

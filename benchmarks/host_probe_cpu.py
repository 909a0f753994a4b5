"""Python cost per call of `BatchDecodeWithPagedKVCacheWrapper.run`, measured on a CPU machine (no GPU).

    PYTHONPATH=$PWD python3 benchmarks/host_probe_cpu.py

The op takes its kernel path (PAGODA_TRITON_ON_CPU=1 with TRITON_INTERPRET=1) and the launch itself is
stubbed, so what is timed is the host work around the launches: validation, output allocation, argument
and key building (first run per layout) or the replay of the recorded launches (repeats). A real launch
adds the compiled launcher (~7 µs per kernel on the H200 machine's host, `benchmarks/launch_probe.py`).
Rows: "rebuilt" = every run goes through the real `decode_fwd` (argument building) with its launch
stubbed, as a run with no recording to replay; "replayed" = repeats replay the launch bound to the layout
(`decode_fwd` replaced by a 45-argument launch of a stand-in kernel for the first, recorded run).
"""
import os
import sys
import time
import types

os.environ["PAGODA_TRITON_ON_CPU"] = "1"
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import pagoda  # noqa: E402
from pagoda.kernels.launch import fast as _launch  # noqa: E402
from pagoda.kernels.attention import decode as kdecode  # noqa: E402
from pagoda.ops import _decode_plan  # noqa: E402


class _Compiled:
    packed_metadata, function = "meta", "fn"
    run = staticmethod(lambda *a: None)


class _Kernel:
    """Stands in for `_decode_kernel`: as many arguments, a launcher that does nothing."""
    arg_names = [f"a{i}" for i in range(45)]
    params = [types.SimpleNamespace(name=n, has_default=False, default=None) for n in arg_names]

    def __getitem__(self, grid):
        return lambda *a, **kw: _Compiled()


def _time_runs(w, q, cache, n=2000, repeats=7) -> float:
    """µs per run: the fastest of ``repeats`` loops of ``n`` runs (the others carry the host's noise)."""
    for _ in range(200):
        w.run(q, cache)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            w.run(q, cache)
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main() -> None:
    kernel = _Kernel()
    real_fwd = kdecode.decode_fwd

    def stub_fwd(q, k, v, ks, vs, indptr, indices, last, page_size, hk, out, lse, **kw):
        # The real host work of decode_fwd, minus the launch: argument building happens in the real one.
        _launch.launch(kernel, (q.shape[0], hk), q, k, v, out, lse, *([kw["chunk"]] * 20), *range(20))

    _launch._device_stream = (lambda: 0, lambda device: 7)
    _decode_plan.num_sms = lambda device: 132
    hq, hk, d, ps = 32, 8, 128, 16
    for batch, ctx in ((1, 4096), (64, 4096)):
        per = ctx // ps
        cache = torch.zeros(batch * per, 2, ps, hk, d, dtype=torch.bfloat16)
        indptr = (torch.arange(batch + 1) * per).int()
        indices = torch.arange(batch * per).int()
        last = torch.full((batch,), ps, dtype=torch.int32)
        q = torch.zeros(batch, hq, d, dtype=torch.bfloat16)
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8), "NHD")
        w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
               disable_split_kv=True)
        real_launch = kdecode.launch
        kdecode.launch = lambda *a, **kw: None     # nothing recorded: every run rebuilds its arguments
        rebuilt = _time_runs(w, q, cache)
        kdecode.launch = real_launch
        kdecode.decode_fwd = stub_fwd
        _launch._ENABLED = True                    # repeats replay the launch bound at the first run
        _launch._compiled.clear()
        w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
               disable_split_kv=True)
        replayed = _time_runs(w, q, cache)
        kdecode.decode_fwd = real_fwd
        _launch._ENABLED = _launch._enabled()
        print(f"b={batch} ctx={ctx}: rebuilt {rebuilt:.1f} us, replayed {replayed:.1f} us of Python per run "
              "(launches stubbed)")


if __name__ == "__main__":
    main()

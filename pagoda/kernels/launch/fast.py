"""Cheap repeat launches of a Triton kernel (host overhead is most of a decode step's attention time).

``kernel[grid](...)`` costs ~30 µs of Python per launch for a kernel with ~40 arguments on the H200
machine (binding, specialisation of every argument, cache lookup), against ~7 µs for the compiled
kernel's own launcher (Triton 3.6). A decode step
launches two kernels per layer, so this is the difference between hiding the launch behind the GPU and
being bound by it.

`launch(kernel, grid, *args, **kwargs)` goes through ``kernel[grid]`` the first time it sees a kernel with
a given *specialisation* and remembers the compiled kernel; later calls whose specialisation key matches
call the compiled launcher directly. The key captures everything Triton specialises on: each tensor's
dtype, device and 16-byte alignment; the exact value of every constexpr; for every other int what Triton
specialises it on (its type by range: i32 / i64 / u64, whether it equals 1, whether it is divisible by
16), so a runtime int that changes every call (a sampler's Philox offset, a sequence length) reuses the
compiled kernel; the exact value of every other argument (floats, bools, None: stricter than needed).
Equal key ⇒ same compiled kernel, so the fast path never runs a kernel compiled for other arguments.

Every launch runs on the device of its first tensor argument, a host tensor descriptor counting as its
base tensor (a device guard, as flash-attn's and
FlashInfer's ops have): a call on ``cuda:1`` tensors while ``cuda:0`` is current launches on ``cuda:1``,
on its current stream, instead of reading another device's memory from the wrong context.

Only Triton versions whose launcher calling convention was checked use the fast path (3.4–3.6:
``run(grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
*args)``); others, the interpreter, launch hooks (profilers) and ``PAGODA_FAST_LAUNCH=0`` take the normal
path every time.
"""
from __future__ import annotations

import torch
import triton

from pagoda import _switches


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host code: that one is a ConstexprFunction costing ~3 µs per call
    (triton 3.6–3.9), paid on every launch that sizes a block; this is plain integer arithmetic."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code (same reason as `next_pow2`)."""
    return -(-a // b)


_VERSION_OK = triton.__version__.split(".")[:2] in (["3", "4"], ["3", "5"], ["3", "6"])


def enabled() -> bool:
    """The fast path is on: a Triton whose launcher this module knows, not interpreting, PAGODA_FAST_LAUNCH not
    off (read at every launch: two environment lookups, well under a microsecond)."""
    return _VERSION_OK and not _switches.interpreting() and _switches.fast_launch()


def _knobs_runtime():
    try:
        from triton import knobs
    except ImportError:  # Triton < 3.4: no knobs (and no fast path)
        return None
    return knobs.runtime


_RUNTIME = _knobs_runtime()


def _no_hooks() -> bool:
    """No launch hook installed (a profiler's hooks need the normal path). Triton 3.6 keeps hooks in
    (possibly empty) ``HookChain`` objects, older versions as None or a function."""
    if _RUNTIME is None:
        return False
    enter, exit_ = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    return ((enter is None or not getattr(enter, "calls", True))
            and (exit_ is None or not getattr(exit_, "calls", True)))


# Process-wide launch caches. `_compiled` is emptied when it reaches _MAX_ENTRIES specialisations (the next
# launches recompile nothing: Triton's own cache still holds the binaries, the first call per key just takes the
# normal path again); the per-kernel tables hold one entry per kernel pagoda launches and are never cleared.
_MAX_ENTRIES = 256
_compiled: dict[tuple, object] = {}     # (kernel, specialisation key) -> compiled kernel
_names: dict[object, tuple] = {}        # kernel -> its parameter names in order
_defaults: dict[object, dict] = {}      # kernel -> {parameter: default} for those that have one
_runtime: dict[object, tuple] = {}      # kernel -> per parameter: True for a runtime (non-constexpr) one


def _int_class(v: int) -> tuple:
    """What Triton 3.4-3.6 specialise a runtime int argument on: its type by range, == 1 (made a
    constant), divisibility by 16 (``tt.divisibility``). Ints of one class share a compiled kernel."""
    kind = 0 if -2**31 <= v < 2**31 else (2 if 2**63 <= v < 2**64 else 1)
    return ("int", kind, v == 1, v % 16 == 0)


_BOOL_KEYS = {True: "bool:True", False: "bool:False"}   # keys that no int equals (True == 1 in Python)


def _descriptor_types() -> set:
    """The host tensor-descriptor classes of this Triton (each may be missing from a build)."""
    found = set()
    for module in ("triton.tools.tensor_descriptor", "triton.experimental.gluon.nvidia.hopper"):
        try:
            found.add(__import__(module, fromlist=["TensorDescriptor"]).TensorDescriptor)
        except Exception:  # noqa: BLE001 - an experimental module may fail to import in many ways
            pass
    return found


_DESC_TYPES = _descriptor_types()


def _desc_key(d) -> tuple:
    """What a host tensor descriptor specialises a kernel on in Triton 3.4-3.6 (its signature type
    ``tensordesc<dtype[block],layout>``): the base dtype, the block shape, the shared layout, plus the base's
    16-byte alignment and the padding mode (stricter than needed). Shapes and strides are launch values."""
    return ("desc", type(d), d.base.dtype, tuple(d.block_shape), getattr(d, "layout", None),
            getattr(d, "padding", None), not d.base.data_ptr() & 15)


def _foreign_device(values, current: int) -> int | None:
    """The CUDA device index of the first tensor in ``values`` (a host tensor descriptor counts as its
    base tensor) when it is not ``current`` (else None)."""
    for v in values:
        if type(v) in _DESC_TYPES:
            v = v.base
        if isinstance(v, torch.Tensor):
            index = v.get_device()
            return index if index >= 0 and index != current else None
    return None


class _NoGuard:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_GUARD = _NoGuard()


def device_of(tensors):
    """``torch.cuda.device(i)`` for the device of the first tensor in ``tensors`` when another device is
    current; otherwise a context that does nothing (the common case costs one ``get_device`` call)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            index = t.get_device()
            if index >= 0 and index != torch.cuda.current_device():
                return torch.cuda.device(index)
            break
    return _NO_GUARD


# (get_current_device, get_current_stream) of Triton's active driver: set at the first launch, never cleared.
_device_stream = None


def _current():
    global _device_stream
    if _device_stream is None:
        from triton.runtime import driver

        _device_stream = (driver.active.get_current_device, driver.active.get_current_stream)
    return _device_stream


def _options(num_warps, num_stages, maxnreg) -> dict:
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return options


def launch(kernel, grid: tuple, *args, num_warps: int = 4, num_stages: int | None = None,
           maxnreg: int | None = None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs, num_warps=..., num_stages=..., maxnreg=...)``, the same call, cheaper
    when repeated. ``kwargs`` must name every parameter after the positional ones (constexprs included).
    Host tensor descriptors (Gluon's or ``triton.tools``') are keyed by what Triton specialises them on
    (`_desc_key`); their shapes, strides and base address are runtime values."""
    if not enabled():
        with device_of(args):
            kernel[grid](*args, **kwargs, **_options(num_warps, num_stages, maxnreg))
        return
    names = _names.get(kernel)
    if names is None:
        names = _names[kernel] = tuple(kernel.arg_names)
        _defaults[kernel] = {p.name: p.default for p in kernel.params
                             if getattr(p, "has_default", False) and p.name != "num_warps"}
        # A parameter not known to be a runtime one is keyed by exact value (the safe side).
        _runtime[kernel] = tuple(not getattr(p, "is_constexpr", True) for p in kernel.params)
    if len(args) + len(kwargs) < len(names):
        kwargs = {**_defaults[kernel], **kwargs}
    if "num_warps" in names:
        # A parameter named num_warps (Gluon kernels declare it a constexpr) takes the launch option's value.
        values = [*args, *(kwargs[n] if n != "num_warps" else num_warps for n in names[len(args):])]
    else:
        values = [*args, *(kwargs[n] for n in names[len(args):])]
    get_device, get_stream = _current()
    device = get_device()
    other = _foreign_device(values, device)
    if other is not None:
        with torch.cuda.device(other):
            return launch(kernel, grid, *args, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
                          **kwargs)
    tensor = torch.Tensor
    # Other values by exact value and type (True, 1 and 1.0 are equal in Python but not to Triton).
    key = (kernel, device, num_warps, num_stages, maxnreg,
           *[(v.dtype, not v.data_ptr() & 15) if isinstance(v, tensor)
             else (_int_class(v) if rt else v) if (t := type(v)) is int
             else _BOOL_KEYS[v] if t is bool
             else _desc_key(v) if t in _DESC_TYPES else (t, v)
             for v, rt in zip(values, _runtime[kernel])])
    try:
        ck = _compiled.get(key)
    except TypeError:  # an unhashable argument (e.g. a descriptor subclass): the normal launch every time
        with device_of(args):
            kernel[grid](*args, **kwargs, **_options(num_warps, num_stages, maxnreg))
        return
    if ck is not None and _no_hooks():
        g0, g1, g2 = (*grid, 1, 1)[:3]
        run = ck.run
        run(g0, g1, g2, get_stream(device), ck.function, ck.packed_metadata, None, None, None, *values)
        if _recorder is not None:
            _recorder.append((ck, (g0, g1, g2), values))
        return
    ck = kernel[grid](*args, **kwargs, **_options(num_warps, num_stages, maxnreg))
    if ck is not None and hasattr(ck, "packed_metadata"):
        if len(_compiled) >= _MAX_ENTRIES:
            _compiled.clear()
        _compiled[key] = ck
        if _recorder is not None:
            _recorder.append((ck, (*grid, 1, 1)[:3], values))


# Bound launches: a caller that repeats the same launches with only some tensors changing (HF decode: one
# call per layer, same shapes) records them once and replays them without rebuilding arguments or keys.
_recorder: list | None = None


class recording:
    """``with recording() as launches:`` collects ``(compiled_kernel, grid, argument_values)`` of every
    launch made through `launch` inside the block (none when the fast path is off: the caller then keeps
    launching normally). The caller owns the promise that a replay's arguments specialise alike: it
    keys its replays on everything the values depend on (shapes, strides, dtypes, 16-byte alignment)."""

    def __enter__(self) -> list:
        global _recorder
        self._outer, _recorder = _recorder, []
        return _recorder

    def __exit__(self, *exc) -> None:
        global _recorder
        _recorder = self._outer


# Triton 3.6's ``CudaLauncher.__call__`` only allocates the global / profile scratch (none for most kernels)
# and forwards to the compiled C launcher, adding a nested function and three calls per launch; for kernels
# without scratch or host tensor descriptors (whose arguments Triton's Python wrapper expands) a bound replay
# calls that C launcher itself. Checked against the 3.6 source (driver.py `CudaLauncher`, `make_launcher`).
_DIRECT_OK = triton.__version__.split(".")[:2] == ["3", "6"]


def _direct(ck) -> tuple:
    """``(fn, head)``: launch compiled kernel ``ck`` as ``fn(g0, g1, g2, stream, *head, *values)``."""
    run = ck.run
    c = getattr(run, "launch", None)
    if (_DIRECT_OK and type(run).__name__ == "CudaLauncher" and type(c).__name__ == "builtin_function_or_method"
            and getattr(run, "global_scratch_size", 1) == 0 and getattr(run, "profile_scratch_size", 1) == 0):
        return c, (ck.function, run.launch_cooperative_grid, run.launch_pdl, None, None, ck.packed_metadata, None,
                   None, None)
    return run, (ck.function, ck.packed_metadata, None, None, None)


class Bound:
    """Launches recorded by `recording`, ready to be issued again with some tensors swapped: for each launch
    the full argument list of its launcher (stream and swapped tensors left empty) and the slots
    ``(argument index, index into tensors)`` to fill. Keeps no reference to the swapped tensors of the
    recording (a per-call cache tensor stays collectable); the others (metadata, workspaces) it keeps."""

    __slots__ = ("calls",)

    def __init__(self, launches, tensors: tuple):
        calls = []
        for ck, (g0, g1, g2), values in launches:
            fn, head = _direct(ck)
            args = [g0, g1, g2, None, *head, *values]
            first = 4 + len(head)
            slots = tuple((first + i, j) for i, val in enumerate(values) for j, t in enumerate(tensors) if val is t)
            for i, _ in slots:
                args[i] = None
            calls.append((fn, args, slots))
        self.calls = tuple(calls)

    def __call__(self, stream: int, tensors: tuple) -> None:
        for fn, args, slots in self.calls:
            a = args.copy()
            a[3] = stream
            for i, j in slots:
                a[i] = tensors[j]
            fn(*a)


def replay(bound: Bound, tensors: tuple) -> bool:
    """Issue ``bound`` again with ``tensors`` swapped in, on the current stream of the first tensor's device
    (made current for the call when another device is). Returns False without launching when launch hooks
    are installed (the caller takes the normal path)."""
    if not _no_hooks():
        return False
    get_device, get_stream = _current()
    device = get_device()
    other = _foreign_device(tensors, device)
    if other is not None:
        with torch.cuda.device(other):
            return replay(bound, tensors)
    bound(get_stream(device), tensors)
    return True


def replay_or_record(bound: dict, key, tensors: tuple, launch_fn, n_launches: int, max_entries: int = 64) -> None:
    """Replay the launches bound to ``key`` in ``bound`` with ``tensors`` swapped in; otherwise call
    ``launch_fn()`` (which must pass exactly these ``tensors`` objects to its launches) and bind what it
    launched to ``key`` when all ``n_launches`` went through the fast path (a first compile or the
    interpreter launches normally and binds nothing).

    ``key`` must hold every value the launches' arguments are computed from besides ``tensors``
    (shapes, strides, dtypes, 16-byte alignment of each tensor, scalars) and the device (a recorded
    launch holds a kernel loaded on one device). The bound launches keep no
    reference to ``tensors`` (a cache passed per call stays collectable)."""
    hit = bound.get(key)
    if hit is not None and replay(hit, tensors):
        return
    with recording() as launches:
        launch_fn()
    if len(launches) != n_launches:
        return
    if len(bound) >= max_entries:
        bound.clear()
    bound[key] = Bound(launches, tensors)


# (autotuner, tuning key) -> the triton.Config it chose: one entry per tuned shape class, never cleared (the
# autotuner keeps the same choice itself).
_tuned_configs: dict[tuple, object] = {}


def tuned_choices() -> dict[str, str]:
    """What the autotuner chose so far in this process, one entry per tuned shape class:
    ``"kernel(key values)" -> "BLOCK_N: 64, num_warps: 8, ..."`` (benchmarks record it: a launch
    configuration picked on a noisy measurement shows up here)."""
    out = {}
    for (tuned, extra, *rest), cfg in _tuned_configs.items():
        name = getattr(getattr(tuned, "fn", None), "__name__", type(tuned).__name__)
        vals = ", ".join(str(v).replace("torch.", "") for v in (*extra, *rest))
        out[f"{name}({vals})"] = str(cfg)
    return out


def launch_tuned(tuned, kernel, grid, *args, extra_key=(), **kwargs) -> None:
    """``tuned[grid](*args, **kwargs)`` for ``tuned = triton.autotune(...)(kernel)``: the first call per
    tuning key (the autotuner's ``key`` arguments and the tensors' dtypes) runs the autotuner; later
    calls launch the configuration it chose through `launch` (the autotuner's own per-call dispatch
    costs as much as the launch itself). ``grid`` may be a callable of the launch meta-parameters.
    ``extra_key``: whatever else the autotuner's pruning depends on (e.g. whether TMA is possible)."""
    if not enabled():
        with device_of(args):
            tuned[grid](*args, **kwargs)
        return
    names = tuned.arg_names
    key = (tuned, extra_key, *(kwargs[k] if k in kwargs else args[names.index(k)] for k in tuned.keys),
           *(a.dtype for a in args if isinstance(a, torch.Tensor)))
    cfg = _tuned_configs.get(key)
    if cfg is None or cfg.pre_hook is not None or getattr(cfg, "num_ctas", 1) != 1:
        with device_of(args):
            tuned[grid](*args, **kwargs)
        best = getattr(tuned, "best_config", None)
        if best is not None:
            _tuned_configs[key] = best
        return
    meta = {**kwargs, **cfg.kwargs}
    launch(kernel, grid(meta) if callable(grid) else grid, *args, num_warps=cfg.num_warps,
           num_stages=cfg.num_stages, **meta)

"""Cheap repeat launches of Gluon kernels whose leading arguments are host TMA descriptors.

A short ``pagoda.flash_attn_func`` call on the Gluon path cost 80-110 µs of host time inside the launch on
the H200 machine (a host profile of the call), about as long as
the kernel itself at b32 s512: building four ``TensorDescriptor`` dataclasses (their validation and layout
``repr`` included, ~15 µs), Triton's ``JITFunction.run`` (binding and specialising every argument, ~35 µs),
and the launcher wrapper, which encodes each descriptor (``fill_tma_descriptor``) and rebuilds the argument
list (~20 µs), before the C launcher (~10 µs).

`tma_launch` does the first launch of each *key* the normal way (``kernel[grid](...)``) and keeps what that
launch resolved: the compiled kernel, its C launcher and the TMA encoding of each descriptor (swizzle,
element type, box). A repeat with the same key encodes the descriptors itself (one ``fill_tma_descriptor``
C call each, from the tensor's address, the global shape and strides the caller gives) and calls the C
launcher directly. The caller's key must hold everything the compiled kernel depends on: the kernel, every
constexpr, the dtype and box of each descriptor, the 16-byte alignment of each pointer argument, the
device; the other runtime arguments must be ones the kernel does not specialise on (``do_not_specialize``
ints, floats).

Only Triton 3.6 takes the repeat path (its launcher convention was read from the 3.6 source: driver.py
``make_tensordesc_arg`` / ``wrap_handle_tensordesc`` / ``CudaLauncher``); other versions, the interpreter,
launch hooks (profilers), kernels that need a global or profile scratch buffer, a device other than the
current one, and ``PAGODA_GLUON_FAST_LAUNCH=0`` launch normally every time.
"""
from __future__ import annotations

import triton

from pagoda import _switches
from pagoda.kernels.launch.fast import _current, _no_hooks

_VERSION_OK = triton.__version__.split(".")[:2] == ["3", "6"]
# key -> (compiled kernel, C launcher, launcher head, per-descriptor encoding, constexpr values): emptied when it
# reaches _MAX_ENTRIES keys (the next launch of each key takes the normal path once and is kept again).
_MAX_ENTRIES = 256
_entries: dict = {}
_FILL: list = []        # [fill_tma_descriptor] of the active driver: set on the first keyed launch, never cleared


def enabled() -> bool:
    """The repeat path is on (Triton 3.6, not interpreting, PAGODA_GLUON_FAST_LAUNCH not off)."""
    return _VERSION_OK and not _switches.interpreting() and _switches.gluon_fast_launch()


def _resolve(ck, n_descs: int):
    """(compiled kernel, C launcher, head, encodings) of a kernel launched once, or None when its launcher is
    not the 3.6 one this module knows (then every launch of that key stays normal)."""
    try:
        from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST
    except ImportError:
        return None
    run = getattr(ck, "run", None)
    inner = getattr(run, "launch", None)
    if (type(run).__name__ != "CudaLauncher" or getattr(run, "global_scratch_size", 1)
            or getattr(run, "profile_scratch_size", 1) or getattr(inner, "__closure__", None) is None):
        return None
    cells = dict(zip(inner.__code__.co_freevars, (c.cell_contents for c in inner.__closure__)))
    c_launch, meta = cells.get("launcher"), cells.get("tensordesc_meta")
    if (type(c_launch).__name__ != "builtin_function_or_method" or not isinstance(meta, (list, tuple))
            or len(meta) != n_descs or any(not isinstance(m, dict) or m.get("fp4_padded") for m in meta)):
        return None
    encodings = tuple((m["swizzle"], m["elem_size"], TMA_DTYPE_DEVICE_TO_HOST[m["elem_type"]], list(m["block_size"]))
                      for m in meta)
    head = (ck.function, run.launch_cooperative_grid, run.launch_pdl, None, None, ck.packed_metadata, None, None,
            None)
    return ck, c_launch, head, encodings


def tma_launch(key, kernel, grid: tuple, descs, args: tuple, constexprs: dict, num_warps: int,
               maxnreg: int | None = None):
    """``kernel[grid](*TensorDescriptors, *args, **constexprs, num_warps=..., maxnreg=...)``, cheaper on repeats.

    descs: one ``(tensor, global_shape, global_strides, block_shape, layout)`` per leading descriptor
    parameter (a Gluon ``TensorDescriptor`` over ``tensor``'s memory; ``global_strides`` in elements, the
    last one 1). args: the runtime arguments after them; constexprs: every other constexpr by name (a Gluon
    kernel's ``num_warps`` parameter takes the launch option). Returns the CompiledKernel (on repeats the one
    of the first launch). The caller runs this with the tensors' device current.
    """
    entry = _entries.get(key)
    if entry is not None and _no_hooks() and _switches.gluon_fast_launch():
        ck, c_launch, head, encodings, tail = entry
        get_device, get_stream = _current()
        values = []
        for (t, shape, strides, _, _), (swizzle, elem_size, elem_type, block) in zip(descs, encodings):
            values.append(_FILL[0](t.data_ptr(), swizzle, elem_size, elem_type, block, shape, strides, 0))
            values += shape
            values += strides
        g0, g1, g2 = (*grid, 1, 1)[:3]
        c_launch(g0, g1, g2, get_stream(get_device()), *head, *values, *args, *tail)
        return ck
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    options = {"num_warps": num_warps} if maxnreg is None else {"num_warps": num_warps, "maxnreg": maxnreg}
    tds = [TensorDescriptor(t, list(shape), list(strides), list(block), layout)
           for t, shape, strides, block, layout in descs]
    ck = kernel[grid](*tds, *args, **constexprs, **options)
    if key is not None and enabled() and key not in _entries:
        if not _FILL:
            _FILL.append(triton.runtime.driver.active.utils.fill_tma_descriptor)
        if len(_entries) >= _MAX_ENTRIES:
            _entries.clear()
        resolved = _resolve(ck, len(descs))
        names = list(getattr(kernel, "arg_names", ()))
        merged = {**constexprs, "num_warps": num_warps}
        tail_names = names[len(descs) + len(args):]
        if resolved is not None and all(n in merged for n in tail_names):
            # The constexpr parameters, in order: part of the key, so fixed for its repeats (the C launcher
            # takes one object per parameter and ignores the constexpr ones).
            _entries[key] = (*resolved, tuple(merged[n] for n in tail_names))
    return ck

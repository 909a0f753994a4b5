"""`pagoda.bench.jit_log.JitLog`: Triton's runtime hooks called as Triton's JIT calls them on a kernel's first
launch (``jit_cache_hook`` before the build, ``jit_post_compile_hook`` after) are recorded, chained to the hooks
installed before, and restored on exit."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from pagoda.bench.jit_log import JitLog

knobs = pytest.importorskip("triton").knobs


def _launch_first_time(name: str, key: str, seconds: float = 0.0):
    """What Triton's JITFunction.run does around a build (keyword arguments as Triton passes them)."""
    kw = dict(key=key, repr=f"{name}[...]", fn=SimpleNamespace(name=name, module="m", jit_function=None),
              compile={"key": key}, is_manual_warmup=False, already_compiled=False)
    rt = knobs.runtime
    if rt.jit_cache_hook is not None and rt.jit_cache_hook(**kw):
        return "skipped"
    time.sleep(seconds)
    if rt.jit_post_compile_hook is not None:
        rt.jit_post_compile_hook(**kw)
    return "built"


@pytest.fixture
def clean_hooks():
    rt = knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    rt.jit_cache_hook = rt.jit_post_compile_hook = None
    yield rt
    rt.jit_cache_hook, rt.jit_post_compile_hook = saved


def test_records_builds_with_their_time_and_restores(clean_hooks):
    with JitLog() as jit:
        _launch_first_time("_prefill_kernel", "k1", 0.02)
        _launch_first_time("_prefill_kernel", "k2")
        _launch_first_time("_rmsnorm_kernel", "k1")
    assert jit.available and jit.count == 3
    assert jit.events[0][0] == "_prefill_kernel" and jit.events[0][1] >= 0.02
    assert jit.seconds >= 0.02
    assert jit.summary().startswith("_prefill_kernel x2 (")
    assert "_rmsnorm_kernel x1" in jit.summary()
    assert clean_hooks.jit_cache_hook is None and clean_hooks.jit_post_compile_hook is None
    _launch_first_time("_after", "k")          # outside: nothing recorded
    assert jit.count == 3


def test_chains_earlier_hooks_and_keeps_their_verdict(clean_hooks):
    seen = []
    clean_hooks.jit_cache_hook = lambda **kw: kw["key"] == "skip"       # an earlier hook that skips one build
    clean_hooks.jit_post_compile_hook = lambda **kw: seen.append(kw["fn"].name)
    before = clean_hooks.jit_cache_hook, clean_hooks.jit_post_compile_hook
    with JitLog() as jit:
        assert _launch_first_time("a", "skip") == "skipped"
        assert _launch_first_time("b", "build") == "built"
    assert seen == ["b"] and [n for n, _ in jit.events] == ["b"]
    assert (clean_hooks.jit_cache_hook, clean_hooks.jit_post_compile_hook) == before


def test_empty_summary():
    assert JitLog().summary() == "" and JitLog().count == 0

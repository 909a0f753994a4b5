"""The shim re-exports pagoda and implements nothing: a name pagoda lacks fails when used, not on import."""
import importlib
import sys
from pathlib import Path

import pytest

import pagoda

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "conformance"


@pytest.fixture()
def shim(monkeypatch):
    monkeypatch.syspath_prepend(str(HARNESS / "shim"))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("flash_attn", "flashinfer", "_conformance_shim"):
            del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_ShimFinder"]


def test_reexports_are_pagoda_objects(shim):
    fa = importlib.import_module("flash_attn")
    fi = importlib.import_module("flashinfer")
    fi_sampling = importlib.import_module("flashinfer.sampling")
    fi_decode = importlib.import_module("flash_attn.flash_attn_interface")
    assert fa.flash_attn_func is pagoda.flash_attn_func
    assert fi.BatchDecodeWithPagedKVCacheWrapper is pagoda.BatchDecodeWithPagedKVCacheWrapper
    assert fi_sampling.top_p_sampling_from_probs is pagoda.sampling.top_p_sampling_from_probs
    assert fi_decode.flash_attn_varlen_func is pagoda.flash_attn_varlen_func


def test_submodule_reached_as_attribute_of_the_package(shim):
    """``import flashinfer; flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper(...)``, as FlashInfer's own tests
    write it: the real package imports its submodules, so the shim's attribute is the submodule file."""
    fi = importlib.import_module("flashinfer")
    assert "flashinfer.decode" not in sys.modules
    assert fi.decode.BatchDecodeWithPagedKVCacheWrapper is pagoda.BatchDecodeWithPagedKVCacheWrapper
    assert fi.prefill.single_prefill_with_kv_cache is pagoda.single_prefill_with_kv_cache
    assert fi.sampling.top_p_sampling_from_probs is pagoda.sampling.top_p_sampling_from_probs
    assert type(fi.SomeFunctionPagodaLacks).__name__ == "Missing"    # no file of that name: still a missing name


def test_missing_name_fails_on_use_with_its_name(shim):
    from _conformance_shim import ShimMissingName

    mod = importlib.import_module("flashinfer.some_module_pagoda_lacks")  # created on import
    thing = mod.SomeWrapperPagodaLacks
    annotation = thing | None  # module-level annotations must not fail at import
    assert annotation is thing
    with pytest.raises(ShimMissingName, match="flashinfer.some_module_pagoda_lacks.SomeWrapperPagodaLacks"):
        thing(1, 2)
    with pytest.raises(ShimMissingName, match=r"SomeWrapperPagodaLacks\.plan"):
        thing.plan()


def test_test_environment_queries(shim):
    utils = importlib.import_module("flashinfer.utils")
    assert utils.has_flashinfer_jit_cache() is True
    assert issubclass(utils.GPUArchitectureError, Exception)

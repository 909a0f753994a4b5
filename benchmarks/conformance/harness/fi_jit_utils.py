"""Harness replacement for FlashInfer's ``tests/test_helpers/jit_utils.py``.

The peer's version builds lists of its JIT module specs (``flashinfer.jit.JitSpec`` from
``flashinfer.decode.gen_*_module`` and friends) that the tests' ``warmup_jit`` fixtures compile ahead
of the tests. That is the peer's build system, not its API: the fixtures only run when
``flashinfer.utils.has_flashinfer_jit_cache()`` is false, and the harness reports true (pagoda
compiles its Triton kernels on first use; there is nothing to build ahead). These functions keep the
peer's names and return no specs.
"""


def gen_decode_attention_modules(*args, **kwargs) -> list:
    """No specs: pagoda has nothing to build ahead of a test."""
    return []


def gen_prefill_attention_modules(*args, **kwargs) -> list:
    """No specs: pagoda has nothing to build ahead of a test."""
    return []


def gen_persistent_batch_attention_modules(*args, **kwargs) -> list:
    """No specs: pagoda has nothing to build ahead of a test."""
    return []

"""Which peer test files the conformance run uses, at which commits, and what the harness replaces.

Both peers are read from local git mirrors (``git archive`` at a pinned commit); nothing of theirs is
committed here. ``fetch_suites.py`` writes them under ``.conformance/`` (ignored by git).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Suite:
    """One peer repository's chosen tests.

    name: folder under ``.conformance/`` (also the suite's rootdir for pytest).
    repo: ``owner/name`` on GitHub.
    tag / commit: the release the files come from; ``commit`` is what is extracted.
    tests: paths (files or folders) handed to pytest, relative to the suite root.
    extract: every path taken from the peer at ``commit`` (tests plus the helpers they import).
    replace: peer path -> harness file (under ``benchmarks/conformance/harness/``) written in its place.
    import_mode: pytest ``--import-mode`` the peer's own configuration uses.
    """

    name: str
    repo: str
    tag: str
    commit: str
    tests: tuple[str, ...]
    extract: tuple[str, ...]
    replace: dict[str, str] = field(default_factory=dict)
    import_mode: str = "prepend"


FLASH_ATTN = Suite(
    name="flash-attention",
    repo="Dao-AILab/flash-attention",
    tag="v2.8.3",
    commit="060c9188beec3a8b62b33a3bfa6d5d2d44975fab",
    tests=("tests/test_flash_attn.py",),
    extract=("tests/test_flash_attn.py",),
)

# FlashInfer's attention tests for the ops pagoda claims (dense/paged prefill and decode, cascade,
# ALiBi, soft cap, sliding window, RoPE, page ops, workspace), its sampling tests, and the
# plain-PyTorch reference tests of the same ops (tests/trace, whose oracles live in the package's
# ``flashinfer/trace`` folder: extracted as the peer's own test oracle, see ``peer_pkg``).
_FI_ATTENTION = (
    "test_alibi.py", "test_batch_decode_kernels.py", "test_batch_prefill.py", "test_batch_prefill_kernels.py",
    "test_decode_prefill_lse.py", "test_logits_cap.py", "test_non_contiguous_decode.py",
    "test_non_contiguous_prefill.py", "test_page.py", "test_rope.py", "test_shared_prefix_kernels.py",
    "test_single_prefill.py", "test_sliding_window.py", "test_tensor_cores_decode.py", "test_workspace_size.py",
)
_FI_TRACE = (
    "append_paged_kv_cache", "apply_llama31_rope", "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace", "apply_rope", "apply_rope_inplace", "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace", "apply_rope_with_cos_sin_cache", "apply_rope_with_cos_sin_cache_inplace",
    "chain_speculative_sampling", "merge_state", "merge_state_in_place", "merge_states", "min_p_sampling",
    "multi_level_cascade_run", "sampling_from_logits", "sampling_from_probs", "single_decode", "single_prefill",
    "softmax", "top_k_mask_logits", "top_k_renorm_probs", "top_k_sampling", "top_k_top_p_sampling",
    "top_k_top_p_sampling_from_logits", "top_p_renorm_probs", "top_p_sampling",
)
# The oracle modules the chosen trace tests import (the peer's plain-PyTorch references).
_FI_TRACE_PKG = (
    "__init__.py", "solution.py", "template.py", "templates/__init__.py", "templates/_init_helpers.py",
    "templates/attention.py", "templates/cascade.py", "templates/page.py", "templates/rope.py",
    "templates/sampling.py",
)
_FI_TESTS = (
    tuple(f"tests/attention/{f}" for f in _FI_ATTENTION)
    + ("tests/utils/test_sampling.py",)
    + tuple(f"tests/trace/test_{op}_reference_correctness.py" for op in _FI_TRACE)
)

FLASHINFER = Suite(
    name="flashinfer",
    repo="flashinfer-ai/flashinfer",
    tag="v0.6.17",
    commit="a0a6b019b9b27d49d209f85d028a1ae5a9b347d7",
    tests=_FI_TESTS,
    extract=_FI_TESTS + (
        "pytest.ini",
        "tests/__init__.py", "tests/conftest.py",
        "tests/attention/__init__.py", "tests/attention/conftest.py",
        "tests/utils/__init__.py",
        "tests/test_helpers",
        "tests/trace/__init__.py", "tests/trace/reference_utils.py",
    ) + tuple(f"flashinfer/trace/{f}" for f in _FI_TRACE_PKG),
    replace={
        # The peer's root conftest imports flashinfer.jit (its build system) and can wrap ops in
        # torch.compile; the harness version keeps only its marker registration and OOM->skip policy.
        "tests/conftest.py": "fi_conftest.py",
        # Builds the peer's JIT modules ahead of the tests (flashinfer.jit / flashinfer.*.gen_*_module);
        # the harness version returns no specs (pagoda compiles its Triton kernels on first use).
        "tests/test_helpers/jit_utils.py": "fi_jit_utils.py",
    },
    import_mode="importlib",
)

SUITES = (FLASH_ATTN, FLASHINFER)

# Pure-Python test dependencies of the peers' suites (flash-attn's tests use einops), downloaded as
# wheels into ``.conformance/_deps`` and put on ``sys.path`` as zip files (GPU machines may be offline).
TEST_DEPS = ("einops==0.8.1",)
DEPS_DIR = "_deps"

# The peer's package code kept for its plain-PyTorch oracles (``flashinfer.trace``) goes here inside
# the suite folder; the shim's ``flashinfer`` package adds ``<suite>/peer_pkg/flashinfer`` to its
# ``__path__`` so that only the subpackages extracted there (``trace``) resolve to the peer's code.
PEER_PKG_DIR = "peer_pkg"
PEER_PACKAGES = ("flashinfer/",)


def destination(path: str) -> str:
    """Where a peer path goes inside its suite folder (package code under ``peer_pkg/``)."""
    return f"{PEER_PKG_DIR}/{path}" if path.startswith(PEER_PACKAGES) else path

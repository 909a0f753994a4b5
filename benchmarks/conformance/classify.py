"""Which peer test cases fall outside pagoda's claim, and how a finished case is counted.

pagoda claims the forward pass of fp16/bf16 attention with head dims that are multiples of 8 up to 256,
and FlashInfer's serving ops on those dtypes. A case is *excluded* (counted and shown, never run for
the pass rate) when its test function or one of its parameters asks for something outside that:

- ``backward``: the function tests gradients (``bwd``/``backward``/``grad`` in its name);
- ``deterministic backward``: flash-attn's ``*_deterministic`` functions (backward determinism);
- ``dropout``: ``dropout_p > 0``;
- ``fp8``: an fp8 dtype among the parameters, or an fp8-quantizing function (``fp8``, ``rope_quantize``);
- ``nvfp4``: NVFP4/FP4 KV cache functions or parameters;
- ``MLA``: multi-head latent attention functions (``mla``), or ``head_dim_qk != head_dim_vo``;
- ``head_dim % 8``: a head dim that is not a multiple of 8;
- ``head_dim > 256``: a head dim above 256.

Exclusions are decided from the test id and its parameters only, before anything runs. Forward
cases of tests that also check gradients are in the claim: their backward part is treated by the
plugin (``conformance_plugin``) and counted as ``passed_fwd`` when every forward assertion passed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

_FUNCTION_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("deterministic backward", re.compile(r"deterministic")),
    ("backward", re.compile(r"bwd|backward|(^|_)grad(_|$)")),
    ("nvfp4", re.compile(r"nvfp4|(^|_)fp4(_|$)|mxfp4")),
    ("fp8", re.compile(r"fp8|float8|rope_quantize")),
    ("MLA", re.compile(r"(^|_)mla(_|$)")),
)
_NAMED_HEAD_DIM = re.compile(r"head_dim_(\d+)")
_HEAD_DIM_PARAMS = {"d", "head_dim", "headdim", "head_size", "head_dim_qk", "head_dim_vo", "head_dim_ckv"}
_FP8_VALUE = re.compile(r"float8|fp8|e4m3|e5m2")
_FP4_VALUE = re.compile(r"nvfp4|fp4|float4|e2m1")

EXCLUSION_REASONS = ("backward", "deterministic backward", "dropout", "fp8", "nvfp4", "MLA",
                     "head_dim % 8", "head_dim > 256")


def flatten_params(params: Mapping[str, object]) -> dict[str, object]:
    """Parameters with dict values (e.g. FlashInfer's ``shape_kwargs``) spread into their keys."""
    flat: dict[str, object] = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            flat.update({str(k): v for k, v in value.items()})
        else:
            flat[name] = value
    return flat


def _as_number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def exclusions(function: str, params: Mapping[str, object]) -> list[str]:
    """Reasons (from ``EXCLUSION_REASONS``) that put the case outside pagoda's claim; empty if inside.

    function: the test function's name (without parametrization).
    params: the case's parameters as recorded at collection (numbers, bools, strings, dtype names).
    """
    reasons: list[str] = []

    def add(reason: str) -> None:
        if reason not in reasons:
            reasons.append(reason)

    for reason, pattern in _FUNCTION_RULES:
        if pattern.search(function):
            add(reason)
    named_dim = _NAMED_HEAD_DIM.search(function)  # e.g. test_..._head_dim_512 (no head_dim parameter)
    if named_dim and int(named_dim.group(1)) > 256:
        add("head_dim > 256")
    flat = flatten_params(params)
    dropout = _as_number(flat.get("dropout_p"))
    if dropout is not None and dropout > 0:
        add("dropout")
    for name, value in flat.items():
        text = str(value).lower()
        if _FP8_VALUE.search(text):
            add("fp8")
        if _FP4_VALUE.search(text):
            add("nvfp4")
        if name in _HEAD_DIM_PARAMS:
            hd = _as_number(value)
            if hd is not None and hd % 8:
                add("head_dim % 8")
            if hd is not None and hd > 256:
                add("head_dim > 256")
    qk, vo = _as_number(flat.get("head_dim_qk")), _as_number(flat.get("head_dim_vo"))
    if qk is not None and vo is not None and qk != vo:
        add("MLA")
    return reasons


# Skip reasons that are really a failure of the op under test: the peer's reference-correctness tests
# catch any exception from the op and skip ("<op> kernel unavailable: <error>").
_SKIP_IS_FAILURE = re.compile(r"unavailable: ")
_OOM_SKIP = re.compile(r"OOM|out of memory", re.IGNORECASE)


def outcome(raw: str, skip_reason: str | None = None) -> str:
    """Normalise a recorded outcome: passed / passed_fwd / failed / skipped / skipped_oom.

    raw: what the plugin recorded (``passed``, ``passed_fwd``, ``failed``, ``error``, ``skipped``).
    skip_reason: the skip's message, when ``raw == "skipped"``.
    """
    if raw in ("passed", "passed_fwd"):
        return raw
    if raw in ("failed", "error"):
        return "failed"
    if raw == "skipped":
        if skip_reason and _SKIP_IS_FAILURE.search(skip_reason):
            return "failed"
        if skip_reason and _OOM_SKIP.search(skip_reason):
            return "skipped_oom"
        return "skipped"
    raise ValueError(f"raw: unknown outcome {raw!r}")

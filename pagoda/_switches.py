"""Every ``PAGODA_*`` environment switch, read here and nowhere else, with one parsing rule.

Rule: unset means the switch's default; ``0``, ``false``, ``off``, ``no`` or the empty string (any case,
surrounding spaces ignored) turn it off; ``1``, ``true``, ``on``, ``yes`` turn it on; any other value raises
ValueError naming the variable. A switch is read when the decision it governs is made (every call), so a
change of the environment, or ``monkeypatch.setenv`` in a test, takes effect at once; the cost is one
``os.environ`` lookup per decision.

The README's "Switches" table lists the same names, defaults and effects (a test compares them).

``TRITON_INTERPRET`` is Triton's own variable; `interpreting` reads it here so that every layer asks the same
question the same way.
"""
from __future__ import annotations

import os

# name -> (default, effect). The effects are the README table's third column.
SWITCHES: dict[str, tuple[bool, str]] = {
    "PAGODA_HOPPER_ATTN": (True, "On Hopper (sm_90), dense fp16/bf16 attention with head_dim 64 or 128 (causal or "
                                 "full) and paged prefill that fits run the warp-specialised Gluon kernels; off sends "
                                 "every call to the Triton kernels."),
    "PAGODA_AUTOTUNE": (True, "The Triton attention and paged-prefill kernels autotune their launch configuration "
                              "at the first call of each shape class; off takes a fixed configuration (faster "
                              "start, slightly slower kernels)."),
    "PAGODA_FAST_LAUNCH": (True, "Repeat launches of a Triton kernel call its compiled launcher directly, skipping "
                                 "Triton's per-call argument binding (Triton 3.4-3.6)."),
    "PAGODA_GLUON_FAST_LAUNCH": (True, "Repeat launches of the Gluon kernels encode their TMA descriptors in pagoda "
                                       "and call the compiled C launcher (Triton 3.6)."),
    "PAGODA_PAGED_FAST_LAUNCH": (False, "The paged Gluon prefill's repeat launches take the same path as the dense "
                                        "Gluon kernels' (opt-in: no faster in the engine's prefill step)."),
    "PAGODA_MASKED_GLUON": (True, "Custom masks in paged prefill on Hopper take the Gluon kernel where it "
                                  "applies (a request of at least 128 queries, fp16/bf16, head_dim 64/128); off "
                                  "keeps them on the Triton kernel."),
    "PAGODA_SAMPLING_SPLIT": (True, "At batch <= 8, plain and min-p sampling split each row over several programs; "
                                    "off keeps one program per row."),
}

_OFF = frozenset(("0", "false", "off", "no", ""))
_ON = frozenset(("1", "true", "on", "yes"))


def enabled(name: str) -> bool:
    """The current value of the switch ``name`` (a key of `SWITCHES`; KeyError for any other name)."""
    default = SWITCHES[name][0]
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ValueError(f"{name}={raw!r}: expected one of 1/true/on/yes or 0/false/off/no (unset: "
                     f"{'on' if default else 'off'})")


def hopper_attention() -> bool:
    return enabled("PAGODA_HOPPER_ATTN")


def autotune() -> bool:
    return enabled("PAGODA_AUTOTUNE")


def fast_launch() -> bool:
    return enabled("PAGODA_FAST_LAUNCH")


def gluon_fast_launch() -> bool:
    return enabled("PAGODA_GLUON_FAST_LAUNCH")


def paged_fast_launch() -> bool:
    return enabled("PAGODA_PAGED_FAST_LAUNCH")


def masked_gluon() -> bool:
    return enabled("PAGODA_MASKED_GLUON")


def sampling_split() -> bool:
    return enabled("PAGODA_SAMPLING_SPLIT")


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET`` set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Test hook, not a user setting: True sends CPU tensors of the paged / RoPE / decode / prefill / cascade ops to the
# Triton kernels (run by the interpreter, so only together with TRITON_INTERPRET) instead of the reference, so that
# tests cover the ops' kernel path end to end without a GPU. Tests set it with ``monkeypatch.setattr`` (or the
# ``triton_on_cpu`` fixture of tests/conftest.py), which restores it; nothing in pagoda writes it.
TRITON_ON_CPU = False


def triton_on_cpu() -> bool:
    """Whether CPU tensors take the Triton kernels (the `TRITON_ON_CPU` test hook, under the interpreter)."""
    return TRITON_ON_CPU and interpreting()

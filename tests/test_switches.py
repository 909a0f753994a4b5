"""`pagoda._switches`: one parsing rule for every PAGODA_* variable, read at call time, listed in the README, and
read nowhere else in the package."""
import pathlib
import re

import pytest

from pagoda import _switches

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("raw, want", [("0", False), ("false", False), (" Off ", False), ("NO", False), ("", False),
                                       ("1", True), ("true", True), ("ON", True), (" yes", True)])
def test_one_parsing_rule(monkeypatch, raw, want):
    for name in _switches.SWITCHES:
        monkeypatch.setenv(name, raw)
        assert _switches.enabled(name) is want


def test_unset_is_the_default_and_changes_apply_at_once(monkeypatch):
    for name, (default, _) in _switches.SWITCHES.items():
        monkeypatch.delenv(name, raising=False)
        assert _switches.enabled(name) is default
        monkeypatch.setenv(name, "0" if default else "1")
        assert _switches.enabled(name) is (not default)
    monkeypatch.setenv("PAGODA_HOPPER_ATTN", "0")
    assert not _switches.hopper_attention()
    monkeypatch.setenv("PAGODA_SAMPLING_SPLIT", "off")
    assert not _switches.sampling_split()


def test_bad_values_and_unknown_names_raise(monkeypatch):
    monkeypatch.setenv("PAGODA_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="PAGODA_AUTOTUNE"):
        _switches.autotune()
    with pytest.raises(KeyError):
        _switches.enabled("PAGODA_NO_SUCH_SWITCH")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _switches.triton_on_cpu()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _switches.triton_on_cpu()
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", False)
    assert not _switches.triton_on_cpu()


def test_readme_table_lists_every_switch():
    rows = re.findall(r"^\| `(PAGODA_\w+)` \| (on|off) \| (.+?) \|$", (ROOT / "README.md").read_text(), re.M)
    assert {name: (default == "on", effect) for name, default, effect in rows} == _switches.SWITCHES


def test_no_other_module_reads_a_pagoda_variable():
    readers = []
    for path in sorted((ROOT / "pagoda").rglob("*.py")):
        if path.name == "_switches.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""(environ|getenv)\W.*["']PAGODA_""", line):
                readers.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not readers, "PAGODA_* read outside pagoda/_switches.py:\n" + "\n".join(readers)

"""Sample a test function's ``@pytest.mark.parametrize`` product while pytest generates it.

flash-attn's ``test_flash_attn.py`` alone holds 508k parametrizations (pytest needs minutes just to
create them); FlashInfer's chosen files 68k. Per test function this enumerates the full product of its
parametrize markers as index tuples (cheap), classifies every combination (``classify.exclusions``),
counts the population, and hands pytest only the sample:

- up to ``per_function`` combinations inside pagoda's claim, first those that bring a parameter value
  not yet covered (greedy), then in a seeded pseudo-random order;
- up to ``excluded_per_reason`` excluded combinations per exclusion reason (to show the error users get).

The sampled cases get the ids pytest would give them (stacked markers joined bottom-up with ``-``;
``pytest.param`` ids and marks, ``ids=`` lists and callables honoured; values pytest cannot name get
``<argname><index>``), so a failing case can be rerun by its node id with the same options.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from collections import defaultdict

import pytest
from _pytest.mark.structures import ParameterSet
from classify import exclusions

_SCALARS = (str, int, float, bool, type(None))


def _key(seed: int, name: str, idx: tuple[int, ...]) -> str:
    return hashlib.sha1(f"{seed}:{name}:{idx}".encode()).hexdigest()


def _default_id(value, argname: str, index: int) -> str:
    if isinstance(value, str):
        return value.encode("unicode_escape").decode("ascii") if value else f"{argname}{index}"
    if isinstance(value, _SCALARS):
        return str(value)
    if isinstance(value, complex) or (isinstance(value, float) and math.isnan(value)):
        return str(value)
    if getattr(value, "__name__", None) and (isinstance(value, type) or callable(value)):
        return value.__name__
    return f"{argname}{index}"


class _Marker:
    """One parametrize marker, normalised: argnames, value tuples, ids, marks."""

    def __init__(self, marker):
        argnames, argvalues = marker.args[0], marker.args[1]
        self.argnames = ([a.strip() for a in argnames.split(",") if a.strip()] if isinstance(argnames, str)
                         else list(argnames))
        ids = marker.kwargs.get("ids")
        self.values, self.marks, self.ids = [], [], []
        for i, v in enumerate(argvalues):
            if isinstance(v, ParameterSet):
                vals, marks, pid = tuple(v.values), list(v.marks), v.id
            else:
                vals, marks, pid = ((v,) if len(self.argnames) == 1 else tuple(v)), [], None
            if pid is None and isinstance(ids, (list, tuple)) and i < len(ids) and ids[i] is not None:
                pid = str(ids[i])
            if pid is None and callable(ids):
                got = [ids(x) for x in vals]
                if all(isinstance(g, str) for g in got):
                    pid = "-".join(got)
            if pid is None:
                pid = "-".join(_default_id(x, a, i) for x, a in zip(vals, self.argnames, strict=False))
            self.values.append(vals)
            self.marks.append(marks)
            self.ids.append(pid)
        self.simple = not marker.kwargs.get("indirect") and not marker.kwargs.get("scope")


def _params(markers: list[_Marker], idx: tuple[int, ...]) -> dict:
    out = {}
    for m, i in zip(markers, idx, strict=False):
        out.update(zip(m.argnames, m.values[i], strict=False))
    return out


def _cover(combos: list[tuple[int, ...]], limit: int, seed: int, name: str) -> list[tuple[int, ...]]:
    ordered = sorted(combos, key=lambda c: _key(seed, name, c))
    chosen, covered = [], set()
    for c in ordered:
        if len(chosen) >= limit:
            break
        new = set(enumerate(c)) - covered
        if new:
            chosen.append(c)
            covered |= new
    taken = set(chosen)
    chosen += [c for c in ordered if c not in taken][: max(0, limit - len(chosen))]
    return chosen


def sample_parametrize(metafunc, per_function: int, excluded_per_reason: int, seed: int,
                       population: dict, roles: dict) -> None:
    """Replace the function's own parametrize markers by one ``metafunc.parametrize`` of the sample.

    population: filled with ``"file::function" -> {"collected", "in_claim", "excluded_by"}``.
    roles: filled with ``nodeid -> "claim" | "excluded"`` for the sampled cases.
    Functions whose parametrize markers are not all their own, simple (no ``indirect``) markers are left
    to pytest untouched.
    """
    definition = metafunc.definition
    raw = list(definition.iter_markers(name="parametrize"))
    own = [m for m in definition.own_markers if m.name == "parametrize"]
    if not raw or len(raw) != len(own):
        return
    markers = [_Marker(m) for m in raw]
    if not all(m.simple for m in markers) or any(not m.values for m in markers):
        return
    name = definition.nodeid
    function = definition.originalname if hasattr(definition, "originalname") else definition.name
    claim: list[tuple[int, ...]] = []
    by_reason: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for idx in itertools.product(*(range(len(m.values)) for m in markers)):
        reasons = exclusions(function, _params(markers, idx))
        (by_reason[reasons[0]] if reasons else claim).append(idx)
    population[name] = {"collected": len(claim) + sum(len(v) for v in by_reason.values()),
                        "in_claim": len(claim), "excluded_by": {k: len(v) for k, v in by_reason.items()}}
    picked = [(c, "claim") for c in _cover(claim, per_function, seed, name)]
    for reason in sorted(by_reason):
        ordered = sorted(by_reason[reason], key=lambda c: _key(seed, name, c))
        picked += [(c, "excluded") for c in ordered[:excluded_per_reason]]
    argnames = [a for m in markers for a in m.argnames]
    params = []
    for idx, role in picked:
        pid = "-".join(m.ids[i] for m, i in zip(markers, idx, strict=False))
        values = [v for m, i in zip(markers, idx, strict=False) for v in m.values[i]]
        marks = [mk for m, i in zip(markers, idx, strict=False) for mk in m.marks[i]]
        params.append(pytest.param(*values, marks=marks, id=pid))
        roles[f"{name}[{pid}]"] = role
    definition.own_markers = [m for m in definition.own_markers if m.name != "parametrize"]
    if params:
        metafunc.parametrize(argnames, params)
    else:  # nothing sampled (all excluded, none asked for): one skipped placeholder, role "excluded"
        pid = "-".join(["none"] * len(argnames))
        roles[f"{name}[{pid}]"] = "excluded"
        metafunc.parametrize(argnames, [pytest.param(*([None] * len(argnames)), id=pid,
                                                     marks=pytest.mark.skip(reason="no case sampled"))])

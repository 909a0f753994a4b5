"""pytest plugin of the conformance runner (``-p conformance_plugin``): record, select, time-box.

Options (all set by ``run.py``):

- ``--conformance-per-function N`` (with ``--conformance-excluded-per-reason M``, ``--conformance-seed S``):
  sample the parametrizations while they are generated (see ``param_sampling``): the peers' suites hold half a
  million cases, which pytest alone needs minutes to collect. Every process given the same options
  generates the same cases, with the node ids pytest would give them.
- ``--conformance-collect-out FILE``: write the collected cases (node id, file, function, parameters, role
  ``claim``/``excluded``), each function's full population (count, exclusions by reason) and every
  collection error as JSON (used with ``--collect-only``).
- ``--conformance-select FILE``: run only the node ids listed in FILE (one a line); the rest is deselected.
- ``--conformance-record FILE``: append one JSON line per finished case (outcome, first error line,
  where it was raised, duration), so results survive a killed run.
- ``--conformance-deadline EPOCH``: cases not started by then are not run (reported ``not_run``).
- ``--conformance-case-timeout S``: a case running longer fails with ``CaseTimeout`` (SIGALRM).
- ``--conformance-fake-capability M.m``: CPU dry runs only. flash-attn's test module asks the CUDA device
  for its capability at import; this answers ``(M, m)`` so collection works without a GPU.

Backward: flash-attn's forward tests also take gradients of the output. pagoda is forward-only, so
``torch.autograd.grad`` on its output raises. The plugin wraps ``torch.autograd.grad``: when the
original raises because the output has no autograd graph, it returns NaN gradients and notes it. The
test then runs on; its forward assertions come first, and if the first failing assertion is one on a
gradient (a statement naming ``dq``/``dk``/``dv``/``dqkv``/``dkv``...), every forward assertion passed:
the case is recorded ``passed_fwd``. Any other failure stays ``failed``.
"""
from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import param_sampling
import pytest
from classify import exclusions

_NO_BACKWARD = re.compile(r"does not require grad|does not have a grad_fn|not differentiable|"
                          r"autograd kernel was not registered|backward is not (supported|implemented)",
                          re.IGNORECASE)
_GRAD_NAME = re.compile(r"\bd(q|k|v|qkv|kv)(\d|_\w+)?\b")


class CaseTimeout(Exception):
    """A case exceeded ``--conformance-case-timeout``."""


class _State:
    backward_unavailable: str | None = None


_STATE = _State()
_COLLECT_ERRORS: list[dict] = []
_POPULATION: dict[str, dict] = {}  # "file::function" -> {"collected", "in_claim", "excluded_by"}
_ROLES: dict[str, str] = {}  # node id -> "claim" / "excluded" (sampled functions)


def pytest_addoption(parser):
    g = parser.getgroup("conformance")
    g.addoption("--conformance-collect-out", default=None)
    g.addoption("--conformance-select", default=None)
    g.addoption("--conformance-record", default=None)
    g.addoption("--conformance-deadline", type=float, default=None)
    g.addoption("--conformance-case-timeout", type=float, default=None)
    g.addoption("--conformance-fake-capability", default=None)
    g.addoption("--conformance-per-function", type=int, default=None)
    g.addoption("--conformance-excluded-per-reason", type=int, default=1)
    g.addoption("--conformance-seed", type=int, default=0)


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)[:120]


def _install_grad_wrapper() -> None:
    import torch

    original = torch.autograd.grad
    if getattr(original, "_conformance_wrapped", False):
        return

    def grad(outputs, inputs, *args, **kwargs):
        try:
            return original(outputs, inputs, *args, **kwargs)
        except (RuntimeError, NotImplementedError) as e:
            if not _NO_BACKWARD.search(str(e)):
                raise
            _STATE.backward_unavailable = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            xs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
            return tuple(torch.full_like(x, float("nan")) for x in xs)

    grad._conformance_wrapped = True
    torch.autograd.grad = grad


def _install_fake_capability(spec: str) -> None:
    import torch

    major, minor = (int(x) for x in spec.split("."))
    torch.cuda.get_device_capability = lambda device=None: (major, minor)


def pytest_configure(config):
    if config.getoption("--conformance-fake-capability"):
        _install_fake_capability(config.getoption("--conformance-fake-capability"))
    _install_grad_wrapper()


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    limit = metafunc.config.getoption("--conformance-per-function")
    if limit is None:
        return
    param_sampling.sample_parametrize(metafunc, limit, metafunc.config.getoption("--conformance-excluded-per-reason"),
                                      metafunc.config.getoption("--conformance-seed"), _POPULATION, _ROLES)


def pytest_collectreport(report):
    if report.failed:
        text = str(report.longrepr)
        lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
        tail = text.strip().splitlines()
        first = lines[-1][1:].strip() if lines else (tail[-1] if tail else "")
        _COLLECT_ERRORS.append({"nodeid": report.nodeid, "error": first[:400]})


def _case(item) -> dict:
    callspec = getattr(item, "callspec", None)
    case = {"nodeid": item.nodeid, "file": item.nodeid.split("::")[0],
            "function": getattr(item, "originalname", None) or item.name.split("[")[0],
            "params": _jsonable(dict(callspec.params)) if callspec else {}}
    case["excluded"] = exclusions(case["function"], case["params"])
    key = f"{case['file']}::{case['function']}"
    if item.nodeid in _ROLES:
        case["role"] = _ROLES[item.nodeid]
    else:  # not sampled (no parametrize marker, or sampling off): every case is its own population
        case["role"] = "excluded" if case["excluded"] else "claim"
        pop = _POPULATION.setdefault(key, {"collected": 0, "in_claim": 0, "excluded_by": {}})
        pop["collected"] += 1
        if case["excluded"]:
            pop["excluded_by"][case["excluded"][0]] = pop["excluded_by"].get(case["excluded"][0], 0) + 1
        else:
            pop["in_claim"] += 1
    return case


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    out = config.getoption("--conformance-collect-out")
    if out:
        cases = [_case(it) for it in items]
        data = {"cases": cases, "population": _POPULATION, "errors": list(_COLLECT_ERRORS)}
        Path(out).write_text(json.dumps(data))
    select = config.getoption("--conformance-select")
    if select:
        wanted = set(Path(select).read_text().split("\n")) - {""}
        keep = [it for it in items if it.nodeid in wanted]
        dropped = [it for it in items if it.nodeid not in wanted]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    deadline = item.config.getoption("--conformance-deadline")
    if deadline is not None and time.time() > deadline:
        item.session.shouldstop = "conformance time budget reached"
        return True  # not run: the runner reports it as not_run
    _STATE.backward_unavailable = None
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("--conformance-case-timeout")
    if not limit:
        return (yield)

    def _timeout(signum, frame):
        raise CaseTimeout(f"case exceeded {limit:.0f} s")

    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _where(excinfo, test_path: str) -> tuple[str | None, str | None, str | None]:
    """(test-file location, its statement, deepest location) of the exception's traceback."""
    test_loc = test_stmt = deepest = None
    for entry in excinfo.traceback:
        loc = f"{entry.path}:{entry.lineno + 1}"
        deepest = loc
        if str(entry.path).endswith(test_path):
            test_loc = loc
            try:
                test_stmt = str(entry.statement).strip()
            except Exception:  # source not available
                test_stmt = None
    return test_loc, test_stmt, deepest


def _error_line(excinfo) -> str:
    text = str(excinfo.value).strip().splitlines()
    return f"{excinfo.typename}: {text[0] if text else ''}"[:400]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    path = item.config.getoption("--conformance-record")
    if not path:
        return report
    if call.when != "call" and report.passed:
        return report  # setup/teardown that went fine: the call phase decides
    rec = {"nodeid": item.nodeid, "when": call.when, "duration": round(call.duration, 3),
           "backward_unavailable": _STATE.backward_unavailable}
    if report.passed:
        rec["raw"] = "passed_fwd" if _STATE.backward_unavailable else "passed"
    elif report.skipped:
        rec["raw"] = "skipped"
        longrepr = report.longrepr
        rec["skip_reason"] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)[:400]
    else:
        rec["raw"] = "error" if call.when != "call" else "failed"
        if call.excinfo is not None:
            test_path = item.nodeid.split("::")[0]
            test_loc, stmt, deepest = _where(call.excinfo, test_path)
            rec.update(error=_error_line(call.excinfo), where=test_loc, deepest=deepest)
            grad_assert = (call.excinfo.errisinstance(AssertionError) and stmt is not None
                           and _GRAD_NAME.search(stmt) is not None)
            if _STATE.backward_unavailable and grad_assert and call.when == "call":
                rec["raw"] = "passed_fwd"
                rec["backward_assert"] = stmt[:200]
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return report

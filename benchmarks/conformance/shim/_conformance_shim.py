"""Machinery of the ``flash_attn`` / ``flashinfer`` shim: re-export pagoda, implement nothing.

Every shim module ``flashinfer.X`` / ``flash_attn.X`` (explicit file or created on import) exposes
pagoda's public names: those of a public top-level pagoda submodule of the same last name when one
exists (``flashinfer.sampling`` -> ``pagoda.sampling``), then those of ``pagoda`` itself. A name pagoda
lacks is not an ``ImportError`` at collection (that would hide every case of a test file behind one
missing helper): it is a placeholder that raises ``ShimMissingName`` when used (called, instantiated,
or an attribute of it called), so each case that needs it fails and is counted with the name.

Test-environment queries that the peer's tests import from ``flashinfer.utils`` (whether a JIT cache
is prebuilt, the device's compute capability) are not API; they live in ``flashinfer/utils.py`` and are
listed in the conformance README.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

# pagoda submodules that are internal or unrelated to the peers' module names.
_INTERNAL = {"ops", "kernels", "reference", "bench", "cli", "integrations"}
PEERS = ("flash_attn", "flashinfer")


class ShimMissingName(AttributeError):
    """The peer API name has no pagoda counterpart (raised on use, not on import)."""


class Missing:
    """Placeholder for a peer name that pagoda does not export."""

    def __init__(self, qualname: str):
        object.__setattr__(self, "_qualname", qualname)

    def _fail(self):
        raise ShimMissingName(f"pagoda has no counterpart of `{self._qualname}` (shim re-exports pagoda only)")

    def __call__(self, *args, **kwargs):
        self._fail()

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return Missing(f"{self._qualname}.{name}")

    # Type annotations at module level (``Missing | None``, ``Missing[int]``) must not fail on import.
    def __or__(self, other):
        return self

    __ror__ = __or__

    def __getitem__(self, item):
        return self

    def __repr__(self) -> str:
        return f"<missing in pagoda: {self._qualname}>"


def _sources(modname: str) -> list[types.ModuleType]:
    import pagoda

    last = modname.rsplit(".", 1)[-1]
    sources = []
    if "." in modname and last not in _INTERNAL and importlib.util.find_spec(f"pagoda.{last}") is not None:
        sources.append(importlib.import_module(f"pagoda.{last}"))
    sources.append(pagoda)
    return sources


def install(modname: str, namespace: dict) -> None:
    """Fill a shim module's namespace with pagoda's public names and a placeholder fallback."""
    sources = _sources(modname)
    exported: list[str] = []
    for src in reversed(sources):  # the more specific source wins
        names = getattr(src, "__all__", [n for n in vars(src) if not n.startswith("_")])
        for name in names:
            namespace[name] = getattr(src, name)
            exported.append(name)
    namespace["__all__"] = sorted(set(exported))

    def __getattr__(name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        for src in sources:
            if hasattr(src, name):
                return getattr(src, name)
        if _has_submodule_file(namespace.get("__path__", ()), name):
            # ``import flashinfer; flashinfer.decode.X``: the real package imports its submodules in its
            # ``__init__``, so the attribute is the submodule, not a missing name.
            return importlib.import_module(f"{modname}.{name}")
        return Missing(f"{modname}.{name}")

    namespace["__getattr__"] = __getattr__


def _has_submodule_file(path, name: str) -> bool:
    """Whether a folder of a package's ``__path__`` (the shim's, the peer's oracle package) holds the
    submodule ``name`` as a file or a package."""
    return any(os.path.isfile(os.path.join(d, name + ".py")) or os.path.isfile(os.path.join(d, name, "__init__.py"))
               for d in path)


class _ShimLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        install(module.__name__, module.__dict__)


class _ShimFinder(importlib.abc.MetaPathFinder):
    """Creates ``flashinfer.X`` / ``flash_attn.X`` modules that have no file in the shim.

    Appended after the regular finders, so real files (the shim's own modules, the peer's oracle
    package extracted under the suite's ``peer_pkg/``) are always found first.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] not in PEERS or "." not in fullname:
            return None
        return importlib.machinery.ModuleSpec(fullname, _ShimLoader(), is_package=True)


def install_finder() -> None:
    if not any(isinstance(f, _ShimFinder) for f in sys.meta_path):
        sys.meta_path.append(_ShimFinder())

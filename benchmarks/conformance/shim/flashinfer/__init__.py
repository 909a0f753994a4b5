"""Shim: `flashinfer` is pagoda (re-export only; see benchmarks/conformance/README.md).

Submodules without a file here (any ``flashinfer.X``) are created on import by the same re-export.
``CONFORMANCE_PEER_PKG`` (set by the runner) names a folder holding parts of the peer's own package
kept as test oracles (``flashinfer/trace``: plain-PyTorch references); it is searched after this folder.
"""
import os

from _conformance_shim import install, install_finder

install_finder()
install(__name__, globals())
if os.environ.get("CONFORMANCE_PEER_PKG"):
    __path__.append(os.path.join(os.environ["CONFORMANCE_PEER_PKG"], "flashinfer"))  # noqa: F821

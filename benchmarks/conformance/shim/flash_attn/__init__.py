"""Shim: `flash_attn` is pagoda (re-export only; see benchmarks/conformance/README.md).

Submodules without a file here (any ``flash_attn.X``) are created on import by the same re-export.
"""
from _conformance_shim import install, install_finder

install_finder()
install(__name__, globals())

"""Shim: `flashinfer.cascade` is pagoda (re-export only; see benchmarks/conformance/README.md)."""
from _conformance_shim import install

install(__name__, globals())

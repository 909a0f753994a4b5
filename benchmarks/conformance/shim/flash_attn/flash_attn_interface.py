"""Shim: `flash_attn.flash_attn_interface` is pagoda (re-export only; see benchmarks/conformance/README.md)."""
from _conformance_shim import install

install(__name__, globals())

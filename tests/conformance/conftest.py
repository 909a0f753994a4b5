"""The conformance harness lives under benchmarks/conformance (not a package): put it on sys.path."""
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "conformance"
if str(HARNESS) not in sys.path:
    sys.path.insert(0, str(HARNESS))

"""``pagoda.sampling``: the samplers under the module path FlashInfer users know (``flashinfer.sampling``).

A re-export of `pagoda.ops.sampling`; see there for the semantics.
"""
from pagoda.ops.sampling import *  # noqa: F401,F403
from pagoda.ops.sampling import __all__  # noqa: F401

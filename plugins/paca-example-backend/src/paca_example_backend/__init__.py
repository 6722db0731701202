"""paca-example-backend: the ``trace`` backend, and a template for third-party backends.

    import paca
    backend = paca.use_backend("trace")           # CPU compute, every call recorded
    ... train as usual ...
    print(backend.trace.summary())                # calls and time per backend member

    paca.register_backend(traced("cuda"))         # the same, around another backend
    paca.use_backend("trace-cuda")

``PACA_TRACE_CHECK_FINITE=1`` stops at the first backend call that produces NaN/Inf.
"""

from __future__ import annotations

from paca_example_backend.backend import CHECK_FINITE_ENV, NonFiniteError, TraceBackend, traced
from paca_example_backend.trace import Trace, TraceEvent

__version__ = "0.1.0"

__all__ = [
    "CHECK_FINITE_ENV",
    "NonFiniteError",
    "Trace",
    "TraceBackend",
    "TraceEvent",
    "traced",
]

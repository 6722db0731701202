"""Entry-point module (group ``paca.backends``, name ``trace``): what paca imports.

Keep it tiny and free of side effects: paca imports it only when the ``trace``
backend is asked for, listed, or auto-detection runs.
"""

from __future__ import annotations

from paca.hookspecs import hookimpl


@hookimpl
def paca_backends() -> list[type]:
    from paca_example_backend.backend import TraceBackend

    return [TraceBackend]

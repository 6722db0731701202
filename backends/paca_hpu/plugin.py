"""Entry-point module of the HPU backend (group ``paca.backends``, name ``hpu``).

Loading this module imports neither torch nor the Intel Gaudi SDK: the backend class
is imported when the registry asks for it, and the SDK only when the backend is
probed or used (see :mod:`paca_hpu.sdk`).
"""

from __future__ import annotations

from paca.hookspecs import hookimpl


@hookimpl
def paca_backends() -> list[type]:
    from paca_hpu.backend import HPUBackend

    return [HPUBackend]

"""Entry-point module of the CPU backend (group ``paca.backends``, name ``cpu``).

Built-in backends register exactly like third-party plugins do.
"""

from __future__ import annotations

from paca.hookspecs import hookimpl


@hookimpl
def paca_backends() -> list[type]:
    from paca_cpu.backend import CPUBackend

    return [CPUBackend]

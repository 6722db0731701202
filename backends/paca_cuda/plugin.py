"""Entry-point module of the CUDA backend (group ``paca.backends``, name ``cuda``).

Registers like any third-party plugin: the class is returned even on machines without
a GPU, where the registry lists it as unavailable with :meth:`CUDABackend.unavailable_reason`.
"""

from __future__ import annotations

from paca.hookspecs import hookimpl


@hookimpl
def paca_backends() -> list[type]:
    from paca_cuda.backend import CUDABackend

    return [CUDABackend]

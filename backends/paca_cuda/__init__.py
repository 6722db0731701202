"""The CUDA backend of paca (entry point ``cuda`` in the ``paca.backends`` group).

Importing this package imports neither torch nor Triton and does not touch the GPU; all
of that happens on first use of :class:`CUDABackend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from paca_cuda.backend import CUDABackend

__all__ = ["CUDABackend"]


def __getattr__(name: str) -> Any:  # lazy, like paca_hpu
    if name == "CUDABackend":
        from paca_cuda.backend import CUDABackend

        return CUDABackend
    raise AttributeError(f"module 'paca_cuda' has no attribute {name!r}")

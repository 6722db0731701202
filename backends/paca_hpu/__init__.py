"""The Intel Gaudi (HPU) backend of paca.

Select it with ``paca.use_backend("hpu")`` or ``PACA_BACKEND=hpu`` (auto-detection
prefers it when a Gaudi is visible). It needs the Intel Gaudi PyTorch bridge
(``habana_frameworks``), which is imported only when the backend is used. See
``docs/backends/hpu.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from paca_hpu.backend import HPUBackend

__all__ = ["HPUBackend"]


def __getattr__(name: str) -> Any:  # lazy: `import paca_hpu` stays free of torch
    if name == "HPUBackend":
        from paca_hpu.backend import HPUBackend

        return HPUBackend
    raise AttributeError(f"module 'paca_hpu' has no attribute {name!r}")

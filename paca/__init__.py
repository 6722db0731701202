"""paca: PaCA (Partial Connection Adaptation) fine-tuning on any backend.

    import paca
    paca.use_backend("hpu")                 # or PACA_BACKEND=hpu, or auto-detection
    model = paca.wrap(model, paca.PacaConfig(r=8, target_modules=["q_proj", "v_proj"]))

``import paca`` is cheap: submodules (and torch) load on first use, and no
backend plugin is imported until a backend is needed.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "PacaConfig": "paca.config",
    "PacaModel": "paca.model",
    "wrap": "paca.model",
    "PacaConfigError": "paca.config",
    "TargetModulesNotFoundError": "paca.targets",
    "ModulesToSaveError": "paca.targets",
    "UnknownAdapterError": "paca.names",
    "TiedWeightsError": "paca.tied_weights",
    "MergeError": "paca.model",
    "TrainableOutsideAdapterError": "paca.model",
    "Backend": "paca.backend_abc",
    "BackendUnavailableError": "paca.backend_abc",
    "BackendCapabilityError": "paca.backend_abc",
    "BackendContractError": "paca.backend_abc",
    "UnknownBackendError": "paca._registry",
    "BackendBuildError": "paca._registry",
    "BackendInfo": "paca._registry",
    "load": "paca.model",
    "AdapterMismatchError": "paca.io",
    "AdapterFormatError": "paca.io",
    "AdapterFileError": "paca.io",
    "export_lora": "paca.export",
    "ExportError": "paca.export",
    "quantize_nf4": "paca.layers_quant",
    "estimate_memory": "paca.estimate",
}

if TYPE_CHECKING:  # pragma: no cover
    from paca._registry import BackendBuildError, BackendInfo, UnknownBackendError
    from paca.backend_abc import (
        Backend,
        BackendCapabilityError,
        BackendContractError,
        BackendUnavailableError,
    )
    from paca.config import PacaConfig, PacaConfigError
    from paca.estimate import estimate_memory
    from paca.export import ExportError, export_lora
    from paca.io import AdapterFileError, AdapterFormatError, AdapterMismatchError
    from paca.layers_quant import quantize_nf4
    from paca.model import MergeError, PacaModel, TrainableOutsideAdapterError, load, wrap
    from paca.names import UnknownAdapterError
    from paca.targets import ModulesToSaveError, TargetModulesNotFoundError
    from paca.tied_weights import TiedWeightsError

__all__ = [
    "AdapterFileError",
    "AdapterFormatError",
    "AdapterMismatchError",
    "Backend",
    "BackendBuildError",
    "BackendCapabilityError",
    "BackendContractError",
    "BackendInfo",
    "BackendUnavailableError",
    "ExportError",
    "MergeError",
    "ModulesToSaveError",
    "PacaConfig",
    "PacaConfigError",
    "PacaModel",
    "TargetModulesNotFoundError",
    "TiedWeightsError",
    "TrainableOutsideAdapterError",
    "UnknownAdapterError",
    "UnknownBackendError",
    "backend",
    "block_backend",
    "estimate_memory",
    "export_lora",
    "get_backend",
    "list_backends",
    "load",
    "quantize_nf4",
    "register_backend",
    "use_backend",
    "wrap",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'paca' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API (``__all__``), also before the lazy names are first used, so tab
    completion (IPython, Jupyter) shows it."""
    return sorted(__all__)


def _reg() -> Any:
    from paca._registry import registry

    return registry()


def use_backend(backend: str | Backend | None) -> Backend | None:
    """Select the backend for this process, by name or as a :class:`Backend` instance
    (``None`` or ``"auto"``: auto-detect again).

    Raises :class:`UnknownBackendError` (listing what exists),
    :class:`BackendUnavailableError` (saying why it cannot run here),
    :class:`BackendBuildError` (its constructor raised) or ``TypeError`` (neither a name
    nor a Backend).
    """
    return _reg().use(backend)


def get_backend() -> Backend:
    """The selected backend: explicit choice, else ``PACA_BACKEND``, else auto-detected."""
    return _reg().current()


def list_backends() -> list[BackendInfo]:
    """Every discovered backend with its provider and availability."""
    return _reg().infos()


@contextlib.contextmanager
def backend(backend: str | Backend) -> Iterator[Backend]:
    """Use a backend (name or instance) inside a ``with`` block (this thread/context only)."""
    with _reg().using(backend) as b:
        yield b


def register_backend(cls: type[Backend]) -> None:
    """Register a backend class at run time (without an installed entry point)."""
    _reg().register(cls)


def block_backend(name: str) -> None:
    """Never load the plugin or backend ``name`` in this process."""
    _reg().block(name)

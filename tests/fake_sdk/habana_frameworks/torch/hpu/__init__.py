"""Fake ``habana_frameworks.torch.hpu`` (registered as ``torch.hpu`` by ``core``).

Device discovery follows the bridge: ``is_available()`` never throws and is
``device_count() > 0``; ``get_device_name()`` warns and returns ``""`` without a device;
``init()`` / ``current_device()`` / ``synchronize()`` raise without one. The device count
and name come from ``FAKE_HPU_DEVICE_COUNT`` (default 1) and ``FAKE_HPU_DEVICE_NAME``
(default ``"GAUDI2"``), read once at import.

Test seams (not in the real SDK; paca's HPU backend checks for them):

``_paca_fake_device = "cpu"``
    Use ``torch.device(_paca_fake_device)`` instead of ``torch.device("hpu")``: stock torch
    cannot allocate tensors on "hpu" without the real plugin.
``_paca_fake_autocast_device_type = "cpu"``
    Device type to pass to ``torch.autocast`` instead of ``"hpu"``.
"""

import threading
import warnings

import torch

from habana_frameworks import _fake_config, _fake_events

from ._utils import _get_device_index
from .graphs import *  # noqa: F403
from .graphs import HPUGraph, ModuleCacher, graph, make_graphed_callables, wrap_in_hpu_graph  # noqa: F401
from .memory import *  # noqa: F403
from .memory import (  # noqa: F401
    max_memory_allocated,
    mem_get_info,
    memory_allocated,
    memory_reserved,
    memory_stats,
    reset_peak_memory_stats,
)
from .random import *  # noqa: F403
from .streams import *  # noqa: F403

_IS_FAKE_HPU_MODULE = True
_paca_fake_device = "cpu"
_paca_fake_autocast_device_type = "cpu"

_initialized = False
_initialization_lock = threading.Lock()
_current_device_index = 0
_dynamic_shape = _fake_config.DYNAMIC_SHAPES_DEFAULT


def _hpu_device_count() -> int:
    return _fake_config.DEVICE_COUNT


def init() -> None:
    """Initialize HPU state; raises when no HPU is found (like ``_hpu_C.init()``)."""
    global _initialized
    if _initialized:
        return
    with _initialization_lock:
        if _initialized:
            return
        if _hpu_device_count() <= 0:
            raise RuntimeError("Device acquire failed: no HPU devices found [fake Gaudi SDK]")
        _initialized = True


def is_initialized() -> bool:
    return _initialized


def is_available() -> bool:
    """True when at least one (fake) HPU is visible. Never throws."""
    try:
        return _hpu_device_count() > 0
    except Exception:
        return False


def device_count() -> int:
    return _hpu_device_count() if is_available() else 0


def get_device_name(device=None) -> str:
    if not is_available():
        warnings.warn("Device not available", stacklevel=2)
        return ""
    init()
    device = _get_device_index(device)
    if device < 0 or device >= device_count():
        raise AssertionError("Invalid device id")
    return _fake_config.DEVICE_NAME


def current_device() -> int:
    init()
    return _current_device_index


def set_device(device) -> None:
    global _current_device_index
    init()
    idx = _get_device_index(device)
    if idx < 0 or idx >= device_count():
        raise AssertionError("Invalid device id")
    _current_device_index = idx


def synchronize() -> None:
    """Wait for all HPU work (fake: CPU work is synchronous; records ``("synchronize",)``)."""
    init()
    _fake_events.record("synchronize")


def set_sync_debug_mode(debug_mode) -> None:
    return None


def set_autocast_hpu_enabled(enabled) -> None:
    torch.set_autocast_enabled(_paca_fake_autocast_device_type, bool(enabled))


def is_autocast_hpu_enabled() -> bool:
    return bool(torch.is_autocast_enabled(_paca_fake_autocast_device_type))


def set_autocast_hpu_dtype(dtype) -> None:
    torch.set_autocast_dtype(_paca_fake_autocast_device_type, dtype)


def get_autocast_hpu_dtype():
    return torch.get_autocast_dtype(_paca_fake_autocast_device_type)


def is_bf16_supported(including_emulation: bool = True) -> bool:
    return is_available()


def enable_dynamic_shape() -> None:
    global _dynamic_shape
    _dynamic_shape = True
    _fake_events.record("dynamic_shape", True)


def disable_dynamic_shape() -> None:
    global _dynamic_shape
    _dynamic_shape = False
    _fake_events.record("dynamic_shape", False)


def get_dynamic_shape_status() -> bool:
    return _dynamic_shape

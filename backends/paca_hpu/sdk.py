"""The only module that touches the Intel Gaudi software (``habana_frameworks``).

Why a separate module: paca must never import the Gaudi SDK unless the HPU backend
is actually used. Importing ``habana_frameworks.torch`` loads the bridge's plugin
library, fixes the execution mode (lazy or eager) for the whole process and patches
torch, so it happens here, on demand, once. Everything else in ``paca_hpu`` goes
through :func:`load_sdk` / :func:`probe`.

The test seams ``habana_frameworks.torch.hpu._paca_fake_device`` and
``_paca_fake_autocast_device_type`` exist only in the fake SDK under
``tests/fake_sdk`` (stock torch cannot allocate "hpu" tensors without the real
plugin); on a real Gaudi they are absent and the device type is ``"hpu"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

SDK_PACKAGE = "habana_frameworks"
SDK_TORCH = "habana_frameworks.torch"
#: First Intel Gaudi release whose bridge defaults ``PT_HPU_LAZY_MODE`` to ``0`` (eager).
EAGER_DEFAULT_SINCE = (1, 21)

INSTALL_HINT = (
    "install the Intel Gaudi software stack and its PyTorch bridge (the habana-torch-plugin "
    "wheels from the Intel Gaudi installer or the Gaudi PyTorch docker image; see "
    "https://docs.habana.ai/en/latest/Installation_Guide/), or pick another backend with "
    "paca.use_backend('cpu') / PACA_BACKEND=cpu"
)


class SDKUnavailableError(RuntimeError):
    """The Gaudi SDK is missing, fails to import, or sees no HPU."""


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def default_lazy_for(version: str) -> bool:
    """The bridge's ``PT_HPU_LAZY_MODE`` default for a release: lazy before 1.21, eager from 1.21."""
    parsed = _version_tuple(version)
    return not parsed or parsed[:2] < EAGER_DEFAULT_SINCE


@dataclass(frozen=True)
class HabanaSDK:
    """Handles to the few SDK modules paca uses, and the mode fixed at import time."""

    torch_module: ModuleType  # habana_frameworks.torch
    core: ModuleType  # habana_frameworks.torch.core (mark_step)
    hpu: ModuleType  # habana_frameworks.torch.hpu (device, graphs, memory)
    version: str
    lazy: bool
    fake: bool

    @property
    def device_type(self) -> str:
        """Device type of tensors on the HPU ("hpu"; the fake SDK's seam on CPU tests)."""
        return str(getattr(self.hpu, "_paca_fake_device", "hpu"))

    @property
    def autocast_device_type(self) -> str:
        """``device_type`` argument for ``torch.autocast`` on this device."""
        return str(getattr(self.hpu, "_paca_fake_autocast_device_type", "hpu"))

    def device_count(self) -> int:
        try:
            return int(self.hpu.device_count()) if self.hpu.is_available() else 0
        except Exception:  # the bridge's is_available never throws; be as careful
            return 0

    def mark_step(self) -> None:
        self.core.mark_step()


_lock = threading.Lock()
_cache: tuple[ModuleType, HabanaSDK] | None = None


def sdk_installed() -> bool:
    """Whether ``habana_frameworks`` can be imported, without importing it."""
    if SDK_PACKAGE in sys.modules:
        return True
    try:
        return importlib.util.find_spec(SDK_PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def _ask_lazy(torch_module: ModuleType, version: str) -> bool:
    """Ask the SDK which mode it loaded; fall back to its documented env default."""
    try:
        internal = importlib.import_module(f"{SDK_TORCH}.utils.internal")
        return bool(internal.is_lazy())
    except (ImportError, AttributeError):
        env = os.environ.get("PT_HPU_LAZY_MODE")
        if env is None:
            return default_lazy_for(version)
        return env.strip() != "0"


def load_sdk() -> HabanaSDK:
    """Import the Gaudi SDK (once) and return its handles; :class:`SDKUnavailableError` if not."""
    global _cache
    if not sdk_installed():
        raise SDKUnavailableError(
            f"the Intel Gaudi software ({SDK_PACKAGE}) is not installed in this Python "
            f"environment; {INSTALL_HINT}"
        )
    with _lock:
        try:
            torch_module = importlib.import_module(SDK_TORCH)
        except Exception as exc:  # the bridge raises AssertionError/OSError on mismatches
            raise SDKUnavailableError(
                f"importing {SDK_TORCH} failed ({type(exc).__name__}: {exc}); check that the "
                f"installed torch is the build that ships with your Intel Gaudi release "
                f"(`pip list | grep -i -e habana -e torch`)"
            ) from exc
        if _cache is not None and _cache[0] is torch_module:
            return _cache[1]
        core = importlib.import_module(f"{SDK_TORCH}.core")
        hpu = importlib.import_module(f"{SDK_TORCH}.hpu")
        version = str(getattr(torch_module, "__version__", "unknown"))
        sdk = HabanaSDK(
            torch_module=torch_module,
            core=core,
            hpu=hpu,
            version=version,
            lazy=_ask_lazy(torch_module, version),
            fake=bool(getattr(sys.modules.get(SDK_PACKAGE), "IS_FAKE", False)),
        )
        _cache = (torch_module, sdk)
        return sdk


def probe() -> tuple[HabanaSDK | None, str | None]:
    """``(sdk, None)`` when an HPU can be used, else ``(sdk_or_None, reason)``. Never raises."""
    try:
        sdk = load_sdk()
    except SDKUnavailableError as exc:
        return None, str(exc)
    except Exception as exc:  # pragma: no cover - defensive: probe must never raise
        return None, f"probing the Intel Gaudi software failed: {type(exc).__name__}: {exc}"
    if sdk.device_count() <= 0:
        return sdk, (
            f"the Intel Gaudi software {sdk.version} is installed but no HPU is visible "
            "(habana_frameworks.torch.hpu.device_count() == 0); check `hl-smi`, "
            "HABANA_VISIBLE_DEVICES / HABANA_VISIBLE_MODULES, and that the container was "
            "started with the Gaudi devices (e.g. --runtime=habana)"
        )
    return sdk, None


def optional_version(distribution: str) -> str | None:
    """Installed version of a distribution, read from metadata (nothing is imported)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(distribution)
    except PackageNotFoundError:
        return None
    except Exception:  # pragma: no cover - broken metadata must not break describe()
        return None


def env_snapshot() -> dict[str, Any]:
    """The Gaudi environment variables that change behaviour, for run records."""
    names = (
        "PT_HPU_LAZY_MODE",
        "PT_HPU_AUTOLOAD",
        "PT_HPU_ENABLE_REFINE_DYNAMIC_SHAPES",
        "PT_HPU_MAX_COMPOUND_OP_SIZE",
        "PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST",
        "PT_HPU_AUTOCAST_FP32_OPS_LIST",
        "HABANA_VISIBLE_DEVICES",
        "HABANA_VISIBLE_MODULES",
    )
    return {n: os.environ[n] for n in names if n in os.environ}
